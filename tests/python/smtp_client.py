"""Drives Mailgate's SMTP listeners with Python's own smtplib. Called by the Rust integration
tests; prints one JSON object per step: {"step", "code", "message"} (plus "challenge" for a
failed XOAUTH2). Stops after the first step answered with 4xx/5xx unless the step says
"continue": true.

usage: smtp_client.py SPEC_JSON
SPEC: {"host": "127.0.0.1", "port": N, "tls": "starttls" | "implicit" | "none", "ca": PEM-or-null,
       "steps": [{"do": "starttls"},
                 {"do": "auth", "mechanism": "PLAIN" | "LOGIN" | "XOAUTH2", "user": U, "secret": PW-or-token},
                 {"do": "mail", "from": A},
                 {"do": "rcpt", "to": A, "continue": true},
                 {"do": "data", "from": A, "to": [A], "subject": S, "pad": BYTES},
                 {"do": "oauth_token", "endpoint": URL, "user": U, "password": P, "client_id": ..., ...}]}
"""
import base64
import json
import smtplib
import ssl
import sys


def out(step, code, message, **extra):
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    print(json.dumps(dict(step=step, code=code, message=message, **extra)), flush=True)
    return code


def message(step):
    body = "hello from smtplib\r\n"
    if step.get("pad"):
        line = "x" * 76 + "\r\n"
        body += line * (step["pad"] // len(line) + 1)
    return (
        "From: {}\r\nTo: {}\r\nSubject: {}\r\nMessage-ID: <smtplib-test@example.com>\r\n\r\n{}".format(
            step["from"], ", ".join(step["to"]), step.get("subject", "smtplib"), body
        )
    )


def main():
    spec = json.loads(sys.argv[1])
    ctx = ssl.create_default_context(cafile=spec.get("ca")) if spec.get("ca") else None
    if ctx is not None:
        ctx.check_hostname = False
    if spec["tls"] == "implicit":
        s = smtplib.SMTP_SSL(spec["host"], spec["port"], timeout=60, context=ctx)
    else:
        s = smtplib.SMTP(spec["host"], spec["port"], timeout=60)
    code, msg = s.ehlo("smtplib.test")
    out("ehlo", code, msg, features=sorted(s.esmtp_features.keys()))
    token = None
    for step in spec["steps"]:
        do = step["do"]
        extra = {}
        if do == "starttls":
            code, msg = s.starttls(context=ctx)
            out(do, code, msg)
            code, msg = s.ehlo("smtplib.test")
            out("ehlo", code, msg, features=sorted(s.esmtp_features.keys()))
            continue
        if do == "oauth_token":
            sys.path.insert(0, __file__.rsplit("/", 1)[0])
            import gmail_client
            token = gmail_client.user_token(step["endpoint"], step).token
            continue
        if do == "auth":
            mech = step["mechanism"]
            secret = step.get("secret") or token
            if mech == "PLAIN":
                code, msg = s.docmd(
                    "AUTH",
                    "PLAIN " + base64.b64encode(("\0%s\0%s" % (step["user"], secret)).encode()).decode(),
                )
            elif mech == "LOGIN":
                s.user, s.password = step["user"], secret
                try:
                    code, msg = s.auth("LOGIN", s.auth_login)
                except smtplib.SMTPAuthenticationError as e:
                    code, msg = e.smtp_code, e.smtp_error
            else:
                seen = []

                def xoauth2(challenge=None):
                    if challenge is not None:
                        seen.append(challenge.decode("utf-8", "replace"))
                        return ""
                    return "user=%s\x01auth=Bearer %s\x01\x01" % (step["user"], secret)

                try:
                    code, msg = s.auth("XOAUTH2", xoauth2, initial_response_ok=True)
                except smtplib.SMTPAuthenticationError as e:
                    code, msg = e.smtp_code, e.smtp_error
                extra["challenge"] = seen[0] if seen else None
            if code == 235:
                s.does_esmtp = True
        elif do == "mail":
            opts = []
            if "size" in step:
                opts.append("SIZE=%d" % step["size"])
            code, msg = s.mail(step["from"], opts)
        elif do == "rcpt":
            code, msg = s.rcpt(step["to"])
        elif do == "data":
            code, msg = s.data(message(step))
        elif do == "rset":
            code, msg = s.rset()
        else:
            raise ValueError(do)
        out(do, code, msg, **extra)
        if code >= 400 and not step.get("continue"):
            break
    try:
        s.quit()
    except smtplib.SMTPServerDisconnected:
        pass


if __name__ == "__main__":
    main()
