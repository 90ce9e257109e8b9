//! Running the real binary: admin commands to completion, and a server in the background that is
//! stopped (SIGTERM, then SIGKILL) when the handle drops. Also the set-ups several test modules
//! share, one helper per job: a demo server ([`demo`]) and its admin token
//! ([`Gateway::demo_admin_token`]), a service-account key file
//! ([`Gateway::sa_key`]), a directory file applied ([`Gateway::apply`]), the Python drivers in
//! `tests/python/` ([`python`], [`python_driver`], [`json_lines`]), a command's `--json` report
//! ([`stdout_json`]), and a test SMTP sink as the smarthost ([`start_sink`], [`smarthost_yaml`],
//! [`FAST_RELAY`]), and a PostgreSQL database of a test's own ([`postgres_database`]).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mailgate_relay::testing::{Sink, SinkConfig};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_mailgate");

/// The repository root (for docs/examples).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn example_org() -> PathBuf {
    repo_root().join("docs/examples/org.yaml")
}

/// A temporary data directory and the commands that work on it.
pub struct Gateway {
    pub dir: tempfile::TempDir,
    /// Listener ports, chosen once so restarts and admin commands agree.
    ports: (u16, u16),
    /// SMTP listener ports: submission, implicit TLS, relay.
    smtp_ports: [u16; 3],
    /// The gateway's own PostgreSQL database when the tests run on PostgreSQL
    /// ([`test_store_is_postgres`]); dropped with the gateway, also when the test panics.
    pg: Option<PgDatabase>,
}

/// Whether this run puts the tests' gateways on PostgreSQL: `MAILGATE_TEST_STORE=postgres`
/// (`scripts/test`'s second pass); unset or `sqlite`, the embedded SQLite file in the data
/// directory. Each [`Gateway`] then gets a fresh database of its own ([`postgres_database`]),
/// named as `[store] url` in the config file [`Gateway::config`] writes, so `serve`, every admin
/// verb and any command a test runs with that config use it; it is dropped with the gateway.
pub fn test_store_is_postgres() -> bool {
    mailgate_store::testing::postgres_requested()
}

impl Gateway {
    pub fn new() -> Self {
        Gateway {
            dir: tempfile::tempdir().expect("tempdir"),
            ports: (free_port(), free_port()),
            smtp_ports: [free_port(), free_port(), free_port()],
            pg: test_store_is_postgres().then(postgres_database),
        }
    }

    /// Where this gateway's store is: its PostgreSQL database's URL, or the SQLite file in its
    /// data directory.
    pub fn store_url(&self) -> String {
        match &self.pg {
            Some(pg) => pg.url.clone(),
            None => self
                .data_dir()
                .join("mailgate.db")
                .to_str()
                .expect("utf-8 path")
                .to_owned(),
        }
    }

    /// Opens this gateway's store in the test's own process (as another node would).
    pub async fn open_store(&self) -> mailgate_store::Stores {
        mailgate_store::open(&self.store_url())
            .await
            .unwrap_or_else(|e| panic!("open the store at {}: {e}", self.store_url()))
    }

    /// The plain-HTTP listener address in the config (what `http.public_url` defaults to).
    pub fn http_addr(&self) -> String {
        format!("127.0.0.1:{}", self.ports.0)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs `mailgate --config <the test config> args...` to completion.
    pub fn cmd(&self, args: &[&str]) -> Output {
        self.cmd_stdin(args, "")
    }

    /// Same, feeding `stdin`.
    pub fn cmd_stdin(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(self.config(""))
            .args(args)
            .env_remove("MAILGATE_CONFIG")
            .env_remove("MAILGATE_DATABASE_URL")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mailgate");
        {
            use std::io::Write;
            let mut si = child.stdin.take().expect("stdin");
            si.write_all(stdin.as_bytes()).expect("write stdin");
        }
        child.wait_with_output().expect("wait mailgate")
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(
            out.status.success(),
            "mailgate {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Writes `yaml` to the file `name` in the temp dir and applies it (`mailgate apply -f`),
    /// which must succeed.
    pub fn apply(&self, name: &str, yaml: &str) {
        let file = self.dir.path().join(name);
        std::fs::write(&file, yaml).expect("write directory file");
        self.ok(&["apply", "-f", file.to_str().expect("utf-8 path")]);
    }

    /// The admin token `serve --demo` wrote to `demo-credentials.txt` in the data directory.
    pub fn demo_admin_token(&self) -> String {
        let creds = std::fs::read_to_string(self.data_dir().join("demo-credentials.txt"))
            .expect("demo credentials");
        creds
            .lines()
            .find_map(|l| l.strip_prefix("admin_token = "))
            .expect("admin token line")
            .trim()
            .to_owned()
    }

    /// Creates a key for the service account `email` (`mailgate sa key create`) in the file
    /// `<email>.json` in the temp dir; returns the file's path.
    pub fn sa_key(&self, email: &str) -> String {
        let path = self.dir.path().join(format!("{email}.json"));
        let path = path.to_str().expect("utf-8 path").to_owned();
        self.ok(&["sa", "key", "create", email, "-o", &path]);
        path
    }

    /// Writes a config file in the temp dir with every listener on a free loopback port (the
    /// ports are fixed in the file so admin commands compute the same public URL).
    pub fn config(&self, extra: &str) -> PathBuf {
        let path = self.dir.path().join("mailgate.toml");
        if path.exists() && extra.is_empty() {
            return path;
        }
        // A test that sets its own [directory] section gets no default one.
        let directory = if extra.contains("[directory]") {
            ""
        } else {
            "[directory]\nreload_interval_ms = 100\n"
        };
        // On PostgreSQL, the gateway's database (unless the test names a store itself).
        let store = match &self.pg {
            Some(pg) if !extra.contains("[store]") => format!("\n[store]\nurl = {:?}\n", pg.url),
            _ => String::new(),
        };
        let text = format!(
            "data_dir = {:?}\n[http]\nlisten = \"127.0.0.1:{}\"\n[https]\nlisten = \"127.0.0.1:{}\"\n[smtp]\nsubmission_listen = \"127.0.0.1:{}\"\nsmtps_listen = \"127.0.0.1:{}\"\nrelay_listen = \"127.0.0.1:{}\"\n{directory}{extra}{store}",
            self.data_dir(),
            self.ports.0,
            self.ports.1,
            self.smtp_ports[0],
            self.smtp_ports[1],
            self.smtp_ports[2]
        );
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// Starts `mailgate serve` (with `extra_args`) and waits until it listens.
    pub fn serve(&self, extra_args: &[&str]) -> Server {
        self.serve_with("", extra_args)
    }

    /// Same, with `extra_config` appended to the config file.
    pub fn serve_with(&self, extra_config: &str, extra_args: &[&str]) -> Server {
        self.serve_wrapped(extra_config, extra_args, &[])
    }

    /// Same, started through `wrapper` (a command that execs the rest, such as
    /// `prlimit --nofile=1024:1024 --`), so the server's process is still the child.
    pub fn serve_wrapped(
        &self,
        extra_config: &str,
        extra_args: &[&str],
        wrapper: &[&str],
    ) -> Server {
        let config = self.config(extra_config);
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let mut child = cmd
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .args(extra_args)
            .env("MAILGATE_LOG", "info")
            .env_remove("MAILGATE_DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mailgate serve");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let banner = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("mailgate: listening http=") {
                    let _ = tx.send(addr.to_owned());
                }
                lines.push(line);
            }
            lines.join("\n")
        });
        let logs = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut s);
            s
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "server did not report its listener within 30 s ({e}); its log:\n{}",
                    logs.join().unwrap_or_default()
                );
            }
        };
        let https = banner_https(&self.config(""));
        let smtp = |key: &str| config_value(&self.config(""), "[smtp]", key);
        Server {
            child: Some(child),
            addr,
            https,
            smtp: smtp("submission_listen"),
            smtps: smtp("smtps_listen"),
            smtp_relay: smtp("relay_listen"),
            banner: Some(banner),
            logs: Some(logs),
        }
    }
}

/// On PostgreSQL, a gateway whose data directory got an SQLite store ran a command that did not
/// use the test's database (one started without the test's config file): that test would pass on
/// SQLite whatever the PostgreSQL store does, so it fails here instead.
impl Drop for Gateway {
    fn drop(&mut self) {
        if self.pg.is_some()
            && !std::thread::panicking()
            && self.data_dir().join("mailgate.db").exists()
        {
            panic!(
                "MAILGATE_TEST_STORE=postgres, yet a command made an SQLite store in {}: run it \
                 with the gateway's config file (Gateway::config) or pass --database-url",
                self.data_dir().display()
            );
        }
    }
}

/// A fresh gateway running `mailgate serve --demo` (the demo organisation, its credentials and a
/// self-signed certificate in `<data dir>/tls/cert.pem`).
pub fn demo() -> (Gateway, Server) {
    let gw = Gateway::new();
    let server = gw.serve(&["--demo"]);
    (gw, server)
}

fn banner_https(config: &Path) -> String {
    let text = std::fs::read_to_string(config).unwrap_or_default();
    text.lines()
        .skip_while(|l| *l != "[https]")
        .find_map(|l| l.strip_prefix("listen = \""))
        .map(|l| l.trim_end_matches('"').to_owned())
        .unwrap_or_default()
}

/// `key = "value"` in `section` of a TOML config file written by [`Gateway::config`].
fn config_value(config: &Path, section: &str, key: &str) -> String {
    let text = std::fs::read_to_string(config).unwrap_or_default();
    let prefix = format!("{key} = \"");
    text.lines()
        .skip_while(|l| *l != section)
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(|l| l.trim_end_matches('"').to_owned())
        .unwrap_or_default()
}

pub struct Server {
    child: Option<Child>,
    pub addr: String,
    /// The HTTPS listener's address (from the config).
    pub https: String,
    /// The SMTP listeners' addresses (from the config): submission, implicit TLS, relay.
    pub smtp: String,
    pub smtps: String,
    pub smtp_relay: String,
    banner: Option<std::thread::JoinHandle<String>>,
    logs: Option<std::thread::JoinHandle<String>>,
}

impl Server {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// A `kB` line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in MB.
    fn status_mb(&self, key: &str) -> f64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// Resident memory now (MB).
    pub fn rss_mb(&self) -> f64 {
        self.status_mb("VmRSS:")
    }

    /// The most resident memory the server has had since it started (MB).
    pub fn peak_rss_mb(&self) -> f64 {
        self.status_mb("VmHWM:")
    }

    /// CPU time the server has used (user + system), from `/proc/<pid>/stat`.
    pub fn cpu_time(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the command name (which is in parentheses and may hold spaces).
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
        let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
        Duration::from_millis(ticks * 10)
    }

    /// Kills the server with SIGKILL (no chance to clean up) and waits for it to die.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits (bounded) for exit; returns (success, stdout, stderr).
    pub fn stop(mut self) -> (bool, String, String) {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = self
            .banner
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let err = self
            .logs
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        (status.is_some_and(|s| s.success()), out, err)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A free loopback port for a server to take later, reserved for the rest of this test process.
///
/// Chosen below the kernel's ephemeral range (32768 and up here): a port the kernel hands out
/// (`bind(0)`) can be taken meanwhile by any test's outgoing connection. Probing a port with
/// `bind` and releasing it is not enough on its own: two tests running at once (nextest runs each
/// in its own process) could probe the same port before either server binds it, and the second
/// server then fails with "Address already in use" (this made CI red once). So each port is also
/// claimed with an exclusive lock on `<tmp>/mailgate-it-ports/<port>.lock`, held by this process
/// until it exits (the kernel releases it then, also when the test panics or is killed): every
/// test of this harness skips a port another test holds, also across a server's restart, when
/// the port is unbound for a while. Tested by `harness_ports_are_never_handed_out_twice`.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::Mutex;
    static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    let locks = std::env::temp_dir().join("mailgate-it-ports");
    let _ = std::fs::create_dir_all(&locks);
    for _ in 0..1000 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = 20_000 + (h.finish() % 12_000) as u16;
        let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(locks.join(format!("{port}.lock")))
        else {
            continue;
        };
        // Another test holds it (or the lock cannot be taken): try another port.
        if file.try_lock().is_err() {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            HELD.lock().unwrap_or_else(|p| p.into_inner()).push(file);
            return port;
        }
    }
    panic!("no free loopback port in 20000-31999")
}

#[test]
fn harness_ports_are_never_handed_out_twice() {
    // A port this process holds is skipped by another process's `free_port`, even while nothing
    // listens on it: the child here is this same test binary, asked for many ports at once.
    if let Ok(held) = std::env::var("MAILGATE_IT_PORTS_HELD") {
        let held: Vec<u16> = held.split(',').filter_map(|p| p.parse().ok()).collect();
        for _ in 0..200 {
            let p = free_port();
            assert!(!held.contains(&p), "port {p} handed out twice");
        }
        return;
    }
    let mine: Vec<u16> = (0..500).map(|_| free_port()).collect();
    let mut unique = mine.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), mine.len(), "one process got a port twice");
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "harness::harness_ports_are_never_handed_out_twice",
        ])
        .env(
            "MAILGATE_IT_PORTS_HELD",
            mine.iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(","),
        )
        .output()
        .expect("run the test binary");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("1 passed"),
        "the child ran no test: {stdout}"
    );
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A minimal HTTP/1.1 GET over a real socket: (status, body).
pub fn http_get(addr: &str, path: &str, bearer: Option<&str>) -> (u16, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .expect("write request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A minimal HTTP/1.1 POST of a JSON body with an admin bearer token: (status, body).
pub fn http_post(addr: &str, path: &str, bearer: &str, json: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bearer}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        json.len()
    )
    .expect("write request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The Python interpreter of the venv `./scripts/test` makes from `tests/python/requirements.txt`
/// (the real client libraries: google-auth, google-api-python-client, sendgrid), from
/// `$MAILGATE_PYTHON`.
pub fn python() -> String {
    std::env::var("MAILGATE_PYTHON").expect(
        "MAILGATE_PYTHON is not set: run ./scripts/test, which creates the venv from tests/python/requirements.txt",
    )
}

/// `python tests/python/<script> <spec>`: one of the drivers in `tests/python/`, given its JSON
/// spec (what to connect to and which actions to take), ready to run with [`json_lines`].
pub fn python_driver(script: &str, spec: &Value) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(repo_root().join("tests/python").join(script))
        .arg(spec.to_string());
    cmd
}

/// Runs `cmd`, which must succeed; parses each line of its standard output as one JSON value
/// (the drivers print one per action).
pub fn json_lines(cmd: &mut Command) -> Vec<Value> {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{:?} failed ({}):\n{}\n{}",
        cmd.get_program(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

/// The one JSON document a command printed on standard output (a `--json` report), whatever its
/// exit status; panics with `what`, the status and both outputs if it is not JSON.
pub fn stdout_json(out: &Output, what: &str) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: standard output is not JSON ({e}), exit {}:\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A `[relay]` config section that retries fast (200-400 ms, polling every 50 ms, a 5 s
/// timeout), so a delivery test waits seconds, not minutes.
pub const FAST_RELAY: &str = "[relay]\nretry_initial_ms = 200\nretry_max_ms = 400\npoll_interval_ms = 50\ntimeout_secs = 5\n";

/// Starts a test SMTP server (`mailgate_relay::testing::Sink`) on a free loopback port, on `rt`
/// (which must outlive it): the smarthost a delivery test relays to and reads back from.
pub fn start_sink(rt: &tokio::runtime::Runtime, config: SinkConfig) -> Sink {
    rt.block_on(Sink::start("127.0.0.1:0", config))
        .expect("start the sink")
}

/// Directory YAML naming one smarthost, `sink`, at `127.0.0.1:<port>` without TLS (where a
/// [`start_sink`] sink listens); give it to [`Gateway::apply`].
pub fn smarthost_yaml(port: u16) -> String {
    format!("smarthosts:\n  - name: sink\n    host: 127.0.0.1\n    port: {port}\n    tls: none\n")
}

/// The PostgreSQL server the tests make their databases on: `MAILGATE_TEST_POSTGRES`, default
/// the machines' trust-auth server (`scripts/test` starts it when it is down).
pub fn postgres_server() -> String {
    mailgate_store::testing::postgres_server()
}

/// A PostgreSQL database of one test's own ([`postgres_database`]), dropped when this value
/// drops, also when the test panics (`WITH (FORCE)`: a server still connected is cut off).
pub struct PgDatabase {
    /// The database's guard (`mailgate_store::testing`, the helper every crate's tests use).
    _db: mailgate_store::testing::TestDb,
    /// Its URL, for `--database-url` or `[store] url`.
    pub url: String,
}

/// Runs SQL on the test server's maintenance database with `psql` (no database client in the
/// test's own dependencies).
pub fn psql(url: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Creates a fresh database on [`postgres_server`] for one test
/// (`mailgate_store::testing::TestDb`: named `mailgate_test_<unix seconds>_<random>`; databases
/// left behind by a test process killed before its guard dropped are dropped after two hours).
pub fn postgres_database() -> PgDatabase {
    let db = mailgate_store::testing::TestDb::create_blocking();
    PgDatabase {
        url: db.url().to_owned(),
        _db: db,
    }
}

impl PgDatabase {
    /// Runs SQL in this database.
    pub fn sql(&self, sql: &str) -> String {
        psql(&self.url, sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}
