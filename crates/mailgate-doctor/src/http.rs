//! The doctor's HTTP client: one HTTP/1.1 request per connection (hyper's client connection
//! over tokio, rustls with Mailgate's TLS policy from `mailgate_tls`), a deadline on the whole
//! exchange and a bound on the answer's size. Enough to talk to Google's and SendGrid's APIs
//! as their client libraries do, small enough to keep every failure nameable ("connection
//! refused", "TLS: certificate not trusted", "timed out after 20 s").

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

use crate::DoctorError;

/// The largest answer read (an error body is a few KB; a send-as list is small).
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Answer {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON, if it is.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether the status is 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// The client.
#[derive(Debug, Clone)]
pub struct Client {
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

impl Client {
    /// A client trusting the public web PKI plus `ca_pem` (a private CA or self-signed
    /// certificate), giving each exchange `timeout`.
    pub fn new(ca_pem: Option<&[u8]>, timeout: Duration) -> Result<Self, DoctorError> {
        let cfg = mailgate_tls::client_config(ca_pem, &[b"http/1.1"])
            .map_err(|e| DoctorError::Tls(e.to_string()))?;
        Ok(Client { tls: cfg, timeout })
    }

    /// `GET url`.
    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Result<Answer, String> {
        self.request("GET", url, headers, None).await
    }

    /// `POST url` with a form body.
    pub async fn post_form(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        form: &[(&str, &str)],
    ) -> Result<Answer, String> {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let mut h = headers.to_vec();
        h.push(("content-type", "application/x-www-form-urlencoded"));
        self.request("POST", url, &h, Some(body.into_bytes())).await
    }

    /// `method url` with a JSON body.
    pub async fn send_json(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &Value,
    ) -> Result<Answer, String> {
        let mut h = headers.to_vec();
        h.push(("content-type", "application/json"));
        self.request(method, url, &h, Some(body.to_string().into_bytes()))
            .await
    }

    /// One request on a new connection. `Err` says, in a few words, why no answer came.
    pub async fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Answer, String> {
        match tokio::time::timeout(self.timeout, self.exchange(method, url, headers, body)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {} s", self.timeout.as_secs_f32())),
        }
    }

    async fn exchange(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Answer, String> {
        let u = url::Url::parse(url).map_err(|e| format!("bad URL `{url}`: {e}"))?;
        let host = u
            .host_str()
            .ok_or_else(|| format!("no host in `{url}`"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let https = match u.scheme() {
            "https" => true,
            "http" => false,
            s => return Err(format!("unsupported scheme `{s}`")),
        };
        let port = u
            .port_or_known_default()
            .unwrap_or(if https { 443 } else { 80 });
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let mut path = u.path().to_owned();
        if let Some(q) = u.query() {
            path.push('?');
            path.push_str(q);
        }
        let authority = match u.port() {
            Some(p) => format!("{}:{p}", u.host_str().unwrap_or(&host)),
            None => u.host_str().unwrap_or(&host).to_owned(),
        };
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", authority)
            .header(
                "user-agent",
                concat!("mailgate-doctor/", env!("CARGO_PKG_VERSION")),
            )
            .header("accept", "application/json");
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| format!("bad request: {e}"))?;
        if https {
            let name = rustls_pki_types::ServerName::try_from(host.clone())
                .map_err(|e| format!("bad host name `{host}`: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
            send(TokioIo::new(tls), req).await
        } else {
            send(TokioIo::new(tcp), req).await
        }
    }
}

async fn send<T>(io: T, req: hyper::Request<Full<Bytes>>) -> Result<Answer, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes()
        .to_vec();
    driver.abort();
    Ok(Answer {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers one request with `head` and then `body_len` bytes of `x`, slowly
    /// if `stall`.
    async fn server(head: String, body_len: usize, stall: bool) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(head.as_bytes()).await;
            if stall {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = body_len;
            while left > 0 {
                let n = left.min(chunk.len());
                if s.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                left -= n;
            }
        });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn a_hostile_server_cannot_make_the_doctor_read_without_bound() {
        let client = Client::new(None, Duration::from_secs(2)).unwrap();
        // 64 MiB announced and sent: refused at 4 MiB.
        let n = 64 * 1024 * 1024;
        let url = server(
            format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n"),
            n,
            false,
        )
        .await;
        let err = client.get(&url, &[]).await.unwrap_err();
        assert!(err.contains("reading the answer"), "{err}");
        // Headers, then nothing: the deadline ends it.
        let url = server(
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n".into(),
            10,
            true,
        )
        .await;
        let t = std::time::Instant::now();
        let err = client.get(&url, &[]).await.unwrap_err();
        assert!(err.contains("no answer within"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn an_answer_is_read_with_its_status_headers_and_body() {
        let client = Client::new(None, Duration::from_secs(5)).unwrap();
        let url = server(
            "HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\nX-RateLimit-Remaining: 0\r\n\r\n"
                .into(),
            5,
            false,
        )
        .await;
        let a = client.get(&url, &[]).await.unwrap();
        assert_eq!(a.status, 403);
        assert_eq!(a.header("x-ratelimit-remaining"), Some("0"));
        assert_eq!(a.text(), "xxxxx");
        assert!(!a.ok());
    }
}
