"""AUTH attempts against Mailgate's submission listeners, from a chosen loopback source address,
timed one by one. Used by the hostile-client tests (crates/mailgate/tests/it/hostile/auth.rs).
Prints one JSON object per attempt: {"thread", "i", "code", "message", "ms"} where "ms" is the
AUTH command's round trip only (connection and STARTTLS not included).

usage: smtp_auth_probe.py SPEC_JSON
SPEC: {"host": "127.0.0.1", "port": N, "tls": "starttls" | "implicit", "ca": PEM,
       "source": "127.0.0.2" or null, "threads": 1, "per_connection": 5,
       "attempts": [{"mechanism": "PLAIN" | "LOGIN", "user": U, "secret": PW,
                     "source": optional per-attempt source, "sleep_ms": optional pause before,
                     "port", "ca": optional per-attempt server (another node) and its CA}]}
"{thread}" in a source is replaced by the thread's number. Each thread runs the whole attempts
list on its own connections (a new connection every "per_connection" attempts, when the source
changes, the attempt's port changes, or when the server closes one). Bounded: the list's length.
"""
import base64
import json
import smtplib
import ssl
import sys
import threading
import time

lock = threading.Lock()


def out(**kw):
    with lock:
        print(json.dumps(kw), flush=True)


def connect(spec, source, port, ca):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    src = (source, 0) if source else None
    if spec["tls"] == "implicit":
        s = smtplib.SMTP_SSL(spec["host"], port, timeout=60, context=ctx, source_address=src)
        s.ehlo("probe.test")
    else:
        s = smtplib.SMTP(spec["host"], port, timeout=60, source_address=src)
        s.ehlo("probe.test")
        s.starttls(context=ctx)
        s.ehlo("probe.test")
    return s


def attempt(s, a):
    b64 = lambda t: base64.b64encode(t.encode()).decode()
    if a["mechanism"] == "PLAIN":
        return s.docmd("AUTH", "PLAIN " + b64("\0%s\0%s" % (a["user"], a["secret"])))
    code, msg = s.docmd("AUTH", "LOGIN " + b64(a["user"]))
    if code != 334:
        return code, msg
    return s.docmd(b64(a["secret"]))


def run(spec, thread):
    s = None
    used = 0
    per = spec.get("per_connection", 5)
    current = None
    for i, a in enumerate(spec["attempts"]):
        source = a.get("source") or spec.get("source")
        if source:
            source = source.replace("{thread}", str(thread))
        if a.get("sleep_ms"):
            time.sleep(a["sleep_ms"] / 1000.0)
        try:
            target = (source, a.get("port", spec["port"]), a.get("ca", spec["ca"]))
            if s is None or used >= per or target != current:
                if s is not None:
                    try:
                        s.quit()
                    except Exception:
                        pass
                s = None
                s = connect(spec, *target)
                current = target
                used = 0
            used += 1
            t = time.perf_counter()
            code, msg = attempt(s, a)
            ms = (time.perf_counter() - t) * 1000.0
            out(thread=thread, i=i, code=code, message=msg.decode("utf-8", "replace"), ms=ms)
            if code == 421:
                s = None
        except Exception as e:  # reported, not raised: the test asserts on the codes
            out(thread=thread, i=i, code=0, message="client error: %r" % (e,), ms=0.0)
            s = None
    if s is not None:
        try:
            s.quit()
        except Exception:
            pass


def main():
    spec = json.loads(sys.argv[1])
    threads = [threading.Thread(target=run, args=(spec, n)) for n in range(spec.get("threads", 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
