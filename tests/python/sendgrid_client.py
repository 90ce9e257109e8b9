"""Drives Mailgate's SendGrid door with the official PyPI `sendgrid` library (6.12.5), unchanged but
for the host. Called by the Rust integration tests; prints one JSON object per action.

usage: sendgrid_client.py SPEC_JSON
SPEC: {"host": "http://127.0.0.1:PORT",
       "actions": [{"do": "send", "key": KEY|null, "from": ..., "to": [...], "cc": [...], "subject": ...,
                    "text": ..., "html": ..., "attachment": {"content": B64, "filename": ..., "type": ...,
                    "disposition": ..., "content_id": ...}, "sandbox": bool, "host_suffix": "/",
                    "no_auth_header": bool},
                   {"do": "send_raw", "key": KEY, "body": {...}},
                   {"do": "until_429", "key": KEY, "from": ..., "to": [...], "max": N, "max_wait": S},
                   {"do": "api", "key": KEY, "method": "get|post|patch|put|delete", "path": "api_keys/ID",
                    "body": {...}|null, "query": {...}|null}]}
`key: null` is an application without a key: the library then sends `Bearer None`. `no_auth_header`
removes the Authorization header the library would send (a request without credentials).
"""
import json
import sys
import time

from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import (Attachment, ContentId, Disposition, FileContent, FileName,
                                   FileType, Mail, MailSettings, SandBoxMode)


def decode(body):
    if body is None:
        return None
    if isinstance(body, bytes):
        body = body.decode()
    return json.loads(body) if body else None


def headers_of(h):
    return {k.lower(): v for k, v in h.items()} if h is not None else {}


def error_of(e):
    return {"ok": False, "kind": type(e).__name__, "status": e.status_code, "reason": e.reason,
            "body": decode(e.body), "to_dict": e.to_dict, "headers": headers_of(e.headers)}


def ok_of(r):
    return {"ok": True, "status": r.status_code, "body": decode(r.body), "headers": headers_of(r.headers)}


def client(host, act):
    sg = SendGridAPIClient(api_key=act.get("key"), host=host + act.get("host_suffix", ""))
    if act.get("no_auth_header"):
        sg.client.request_headers.pop("Authorization", None)
    return sg


def message(act):
    m = Mail(from_email=act["from"], to_emails=act["to"], subject=act.get("subject", "hello"),
             plain_text_content=act.get("text", "hello from the test"),
             html_content=act.get("html"))
    for cc in act.get("cc", []):
        m.add_cc(cc)
    a = act.get("attachment")
    if a:
        att = Attachment(FileContent(a["content"]), FileName(a["filename"]), FileType(a.get("type", "application/octet-stream")),
                         Disposition(a.get("disposition", "attachment")))
        if a.get("content_id"):
            att.content_id = ContentId(a["content_id"])
        m.attachment = att
    if act.get("sandbox"):
        m.mail_settings = MailSettings(sandbox_mode=SandBoxMode(True))
    return m


def main():
    spec = json.loads(sys.argv[1])
    host = spec["host"]
    for act in spec["actions"]:
        try:
            if act["do"] == "send":
                out = ok_of(client(host, act).send(message(act)))
            elif act["do"] == "send_raw":
                out = ok_of(client(host, act).send(act["body"]))
            elif act["do"] == "send_text":
                # A body sent as it is (malformed JSON, another Content-Type): the library
                # encodes a string as it is when the Content-Type is not exactly
                # application/json.
                sg = client(host, act)
                sg.client.request_headers["Content-Type"] = act["content_type"]
                c = sg.client
                for seg in act.get("path", "mail/send").split("/"):
                    c = c._(seg)
                out = ok_of(c.post(request_body=act["body"]))
            elif act["do"] == "send_big":
                # A valid request whose text is `text_bytes` long (past 30 MB: refused).
                m = message(dict(act, text="x" * act["text_bytes"]))
                out = ok_of(client(host, act).send(m))
            elif act["do"] == "until_429":
                # Send until the rate limit answers 429, then do what an application does with the
                # reset header: wait until then (bounded) and send again.
                sg = client(host, act)
                sent = 0
                out = None
                for _ in range(act.get("max", 30)):
                    try:
                        sg.send(message(act))
                        sent += 1
                    except HTTPError as e:
                        err = error_of(e)
                        reset = int(e.headers["X-RateLimit-Reset"])
                        wait = reset - time.time()
                        assert wait <= act.get("max_wait", 30), ("reset too far ahead", wait)
                        time.sleep(max(0.0, wait) + 0.2)
                        retried = ok_of(sg.send(message(act)))
                        out = {"ok": True, "sent_before": sent, "refusal": err, "retried": retried,
                               "waited": wait}
                        break
                if out is None:
                    out = {"ok": False, "kind": "no 429", "sent_before": sent}
            elif act["do"] == "api":
                c = client(host, act).client
                for seg in act["path"].split("/"):
                    c = c._(seg)
                kwargs = {}
                if act.get("body") is not None:
                    kwargs["request_body"] = act["body"]
                if act.get("query") is not None:
                    kwargs["query_params"] = act["query"]
                out = ok_of(getattr(c, act["method"])(**kwargs))
            else:
                raise ValueError("unknown action " + act["do"])
        except HTTPError as e:
            out = error_of(e)
        except OSError as e:  # e.g. BrokenPipeError: the server closed while the client wrote
            out = {"ok": False, "kind": type(e).__name__, "message": str(e)}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
