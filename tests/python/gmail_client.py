"""Drives Mailgate's Gmail door with Google's own client libraries, unchanged but for the endpoint
and the key file. Called by the Rust integration tests; prints one JSON object per action.

usage: gmail_client.py SPEC_JSON
SPEC: {"endpoint": "http://127.0.0.1:PORT",
       "auth": {"service_account": KEYFILE, "subject": EMAIL|null, "scopes": [...]}
             | {"user": EMAIL, "password": PW, "client_id": ID, "client_secret": S,
                "redirect_uri": URI, "scopes": [...]},
       "actions": [{"do": "send", "user_id": "me", "from": ..., "to": [...], "subject": ..., "upload": "json|media|multipart|resumable"},
                   {"do": "profile"}, {"do": "send_as"}, {"do": "refresh"}, {"do": "tokeninfo"},
                   {"do": "revoke", "endpoint": URL (default: the spec's)}, {"do": "sleep", "seconds": S}]}
"""
import base64
import hashlib
import json
import secrets
import sys
import time
import urllib.parse

import requests
import google.auth.transport.requests
from google.auth.exceptions import RefreshError
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError
from googleapiclient.http import MediaIoBaseUpload
import io


def user_token(endpoint, a):
    """The authorization-code flow with PKCE, as a browser and an app would do it."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    params = {
        "client_id": a["client_id"], "redirect_uri": a["redirect_uri"], "response_type": "code",
        "scope": " ".join(a["scopes"]), "state": "xyz", "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    browser = requests.Session()  # keeps the sign-in page's anti-CSRF cookie, as a browser does
    page = browser.get(endpoint + "/o/oauth2/auth", params=params, timeout=10)
    assert page.status_code == 200, page.text
    for s in a["scopes"]:
        assert s in page.text, "consent page does not list " + s
    csrf = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    form = dict(params, email=a["user"], password=a["password"], csrf_token=csrf)
    r = browser.post(endpoint + "/o/oauth2/auth", data=form, allow_redirects=False, timeout=10)
    assert r.status_code in (302, 303, 307), (r.status_code, r.text)
    q = urllib.parse.parse_qs(urllib.parse.urlparse(r.headers["Location"]).query)
    assert q["state"] == ["xyz"]
    tok = requests.post(endpoint + "/token", data={
        "grant_type": "authorization_code", "code": q["code"][0], "redirect_uri": a["redirect_uri"],
        "client_id": a["client_id"], "client_secret": a["client_secret"], "code_verifier": verifier,
    }, timeout=10)
    assert tok.status_code == 200, tok.text
    t = tok.json()
    return user_credentials.Credentials(
        token=t["access_token"], refresh_token=t["refresh_token"], token_uri=endpoint + "/token",
        client_id=a["client_id"], client_secret=a["client_secret"], scopes=a["scopes"])


def error_of(e):
    if isinstance(e, HttpError):
        body = json.loads(e.content.decode() or "{}")
        return {"ok": False, "kind": "HttpError", "status": e.resp.status, "reason": e.reason,
                "details": e.error_details, "body": body,
                "retry_after": e.resp.get("retry-after"),
                "www_authenticate": e.resp.get("www-authenticate"),
                "decision": e.resp.get("x-mailgate-decision")}
    if isinstance(e, RefreshError):
        data = e.args[1] if len(e.args) > 1 and isinstance(e.args[1], dict) else {}
        return {"ok": False, "kind": "RefreshError", "message": str(e.args[0]), "body": data}
    raise e


def padded(raw, size):
    """`raw` grown to `size` bytes with 78-byte lines of text (a large message, as a big
    attachment would make it)."""
    line = b"x" * 76 + b"\r\n"
    missing = max(0, size - len(raw))
    return raw + line * (missing // len(line)) + b"y" * (missing % len(line))


def raw_http(endpoint, creds, act):
    """A send the client library would not make (it refuses media over 35 MiB itself): the
    message, `body_bytes` long, POSTed (or PUT to a resumable session) with the credential, as
    one body with a Content-Length or, with "chunked", in 1 MiB chunks without one."""
    session = google.auth.transport.requests.AuthorizedSession(creds)
    head = "From: {}\r\nTo: {}\r\nSubject: big\r\n\r\n".format(act["from"], ", ".join(act["to"]))
    raw = padded(head.encode(), act["body_bytes"])
    data = raw
    if act.get("chunked"):
        data = (raw[i:i + (1 << 20)] for i in range(0, len(raw), 1 << 20))
    url = endpoint + "/upload/gmail/v1/users/me/messages/send?uploadType=" + act.get("upload", "media")
    method = "POST"
    if act.get("upload") == "resumable":
        start = session.post(url, json={}, timeout=30)
        assert start.status_code == 200, (start.status_code, start.text)
        url, method = start.headers["Location"], "PUT"
    r = session.request(method, url, data=data, headers={"Content-Type": "message/rfc822"}, timeout=120)
    try:
        body = r.json()
    except ValueError:
        body = {"text": r.text[:500]}
    details = body.get("error", {}).get("details") if isinstance(body.get("error"), dict) else None
    return {"ok": r.status_code < 300, "kind": "http", "status": r.status_code, "body": body,
            "details": details, "content_type": r.headers.get("content-type"),
            "decision": r.headers.get("x-mailgate-decision")}


def main():
    spec = json.loads(sys.argv[1])
    endpoint = spec["endpoint"]
    a = spec["auth"]
    if "service_account" in a:
        creds = service_account.Credentials.from_service_account_file(
            a["service_account"], scopes=a["scopes"], subject=a.get("subject"))
    else:
        creds = user_token(endpoint, a)
    svc = build("gmail", "v1", credentials=creds, client_options={"api_endpoint": endpoint},
                static_discovery=True)
    for act in spec["actions"]:
        try:
            if act["do"] == "send":
                lines = []
                if act.get("from"):
                    lines.append("From: " + act["from"])
                lines.append("To: " + ", ".join(act["to"]))
                lines.append("Subject: " + act.get("subject", "hello"))
                raw = ("\r\n".join(lines) + "\r\n\r\n" + act.get("body", "hello from the test") + "\r\n").encode()
                if act.get("body_bytes"):
                    raw = padded(raw, act["body_bytes"])
                upload = act.get("upload", "json")
                users = svc.users().messages()
                if upload == "json":
                    req = users.send(userId=act.get("user_id", "me"),
                                     body={"raw": base64.urlsafe_b64encode(raw).decode()})
                else:
                    media = MediaIoBaseUpload(io.BytesIO(raw), mimetype="message/rfc822",
                                              resumable=(upload == "resumable"))
                    req = users.send(userId=act.get("user_id", "me"),
                                     body={} if upload != "media" else None, media_body=media)
                out = {"ok": True, "response": req.execute()}
            elif act["do"] == "http":
                out = raw_http(endpoint, creds, act)
            elif act["do"] == "profile":
                out = {"ok": True, "response": svc.users().getProfile(userId=act.get("user_id", "me")).execute()}
            elif act["do"] == "send_as":
                out = {"ok": True, "response": svc.users().settings().sendAs().list(userId="me").execute()}
            elif act["do"] == "send_as_create":
                body = {"sendAsEmail": act["email"], "displayName": act.get("name", "")}
                out = {"ok": True, "response": svc.users().settings().sendAs().create(userId="me", body=body).execute()}
            elif act["do"] == "send_as_patch":
                out = {"ok": True, "response": svc.users().settings().sendAs().patch(
                    userId="me", sendAsEmail=act["email"], body={"displayName": act["name"]}).execute()}
            elif act["do"] == "send_as_verify":
                svc.users().settings().sendAs().verify(userId="me", sendAsEmail=act["email"]).execute()
                out = {"ok": True}
            elif act["do"] == "send_as_delete":
                svc.users().settings().sendAs().delete(userId="me", sendAsEmail=act["email"]).execute()
                out = {"ok": True}
            elif act["do"] == "refresh":
                old = creds.token
                creds.refresh(google.auth.transport.requests.Request())
                out = {"ok": True, "rotated": creds.token != old}
            elif act["do"] == "refresh_token":
                # For `mailgate doctor oauth` tests: the user's refresh token, as an app stores it.
                out = {"ok": True, "refresh_token": creds.refresh_token}
            elif act["do"] == "revoke":
                # POST /revoke of the access token, at this endpoint or another node's.
                r = requests.post(act.get("endpoint", endpoint) + "/revoke",
                                  data={"token": creds.token}, timeout=10)
                out = {"ok": r.status_code == 200, "status": r.status_code}
            elif act["do"] == "sleep":
                time.sleep(act["seconds"])
                out = {"ok": True}
            elif act["do"] == "tokeninfo":
                r = requests.get(endpoint + "/tokeninfo", params={"access_token": creds.token}, timeout=10)
                out = {"ok": r.status_code == 200, "response": r.json()}
            else:
                raise ValueError("unknown action " + act["do"])
        except (HttpError, RefreshError) as e:
            out = error_of(e)
        except OSError as e:  # e.g. BrokenPipeError: the server closed while the client wrote
            out = {"ok": False, "kind": type(e).__name__, "message": str(e)}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
