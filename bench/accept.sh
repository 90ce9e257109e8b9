#!/usr/bin/env bash
# Acceptance and delivery throughput: Mailgate's Gmail door versus Postfix, side by side in one run
# on this machine. Both accept 10 KB messages durably (Mailgate: SQLite WAL, synchronous=FULL;
# Postfix: its fsync'd queue) and relay them to the same local smtp-sink.
#
#   ./bench/accept.sh [COUNT]        (default 2000 messages per run)
#
# Prints a markdown table for docs/performance.md. Loopback only; every loop is bounded.
# While tuning: CLIENTS="1 16" MAILGATE_ONLY=1 ./bench/accept.sh 1000 skips Postfix (the ratio
# column is then meaningless; published numbers always come from a full run).
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${1:-2000}
SIZE=10240
WORK=$(mktemp -d /tmp/mailgate-bench.XXXXXX)
SINK_PORT=2525
HTTP_PORT=7180
log() { printf '==> %s\n' "$*" >&2; }

if ! command -v smtp-source >/dev/null 2>&1 && [ ! -x /usr/sbin/smtp-source ]; then
  log "installing postfix (smtp-source, smtp-sink) from Debian's packages"
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
fi
export PATH="$PATH:/usr/sbin"

log "building release binaries"
cargo build --release -q -p mailgate -p mailgate-loadgen
MG=target/release/mailgate
LOADGEN=target/release/mailgate-loadgen

cleanup() {
  [ -n "${MG_PID:-}" ] && kill "$MG_PID" 2>/dev/null || true
  [ -n "${SINK_PID:-}" ] && kill "$SINK_PID" 2>/dev/null || true
  postfix stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

log "smtp-sink on 127.0.0.1:$SINK_PORT (the common destination)"
smtp-sink -u postfix 127.0.0.1:$SINK_PORT 256 &
SINK_PID=$!

# ---- Postfix ---------------------------------------------------------------------------------
log "configuring Postfix: loopback only, relaying everything to the sink"
# Debian's "No configuration" install leaves no main.cf.
[ -f /etc/postfix/main.cf ] || cp /usr/share/postfix/main.cf.debian /etc/postfix/main.cf
postconf -e "myhostname = bench.localdomain" "mydomain = localdomain" "myorigin = localdomain"
postconf -e "inet_interfaces = 127.0.0.1" "inet_protocols = ipv4" "mydestination =" \
  "relayhost = [127.0.0.1]:$SINK_PORT" "mynetworks = 127.0.0.0/8" \
  "smtpd_recipient_restrictions = permit_mynetworks, reject" "maillog_file = /var/log/postfix-bench.log" \
  "default_process_limit = 200" "smtpd_client_connection_count_limit = 0" \
  "smtp_tls_security_level = none" "compatibility_level = 3.6"
postfix stop >/dev/null 2>&1 || true
postfix start >/dev/null 2>&1
sleep 1

drain_postfix() {
  local start=$1
  for _ in $(seq 1 600); do
    if postqueue -p 2>/dev/null | grep -q "Mail queue is empty"; then break; fi
    sleep 0.1
  done
  echo "$(( $(date +%s%N) - start ))"
}

declare -A PF_RATE PF_DRAIN
CLIENTS=${CLIENTS:-"1 16 64"}
for C in $CLIENTS; do
  if [ -n "${MAILGATE_ONLY:-}" ]; then PF_RATE[$C]=1; PF_DRAIN[$C]=-; continue; fi
  N=$COUNT; [ "$C" = 1 ] && N=$(( COUNT / 4 ))
  t0=$(date +%s%N)
  smtp-source -c -l $SIZE -m "$N" -s "$C" -f alice@example.com -t bench@example.org 127.0.0.1:25 >/dev/null
  t1=$(date +%s%N)
  PF_RATE[$C]=$(python3 -c "print(round($N/(($t1-$t0)/1e9),1))")
  PF_DRAIN[$C]=$(python3 -c "print(round($N/($(drain_postfix "$t0")/1e9),1))")
  log "postfix C=$C: ${PF_RATE[$C]}/s accepted, ${PF_DRAIN[$C]}/s delivered"
done
postfix stop >/dev/null 2>&1 || true

# ---- Mailgate --------------------------------------------------------------------------------
log "starting Mailgate (SQLite, durable acceptance, relaying to the same sink)"
DATA=$WORK/mailgate
cat > "$WORK/mailgate.toml" <<TOML
data_dir = "$DATA"
[http]
listen = "127.0.0.1:$HTTP_PORT"
[log]
level = "warn"
[relay]
workers = 4
TOML
$MG --config "$WORK/mailgate.toml" apply -f docs/examples/org.yaml >/dev/null
cat > "$WORK/bench.yaml" <<YAML
smarthosts:
  - {name: sink, host: 127.0.0.1, port: $SINK_PORT, tls: none}
limits:
  messages_per_day: 100000000
  recipients_per_day: 100000000
  rate_units_per_minute: 100000000000
  concurrent_sends: 100000
YAML
$MG --config "$WORK/mailgate.toml" apply -f "$WORK/bench.yaml" >/dev/null
$MG --config "$WORK/mailgate.toml" serve > "$WORK/mailgate.out" 2>&1 &
MG_PID=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null && break; sleep 0.1; done

# A user access token through the authorization-code flow (the demo client has a secret).
LOC=$(curl -s -o /dev/null -w '%{redirect_url}' -X POST "http://127.0.0.1:$HTTP_PORT/o/oauth2/auth" \
  --data-urlencode client_id=demo-web-client --data-urlencode redirect_uri=http://127.0.0.1:8765/callback \
  --data-urlencode response_type=code --data-urlencode scope=https://www.googleapis.com/auth/gmail.send \
  --data-urlencode email=alice@example.com --data-urlencode "password=correct horse battery staple")
CODE=$(python3 -c "import sys,urllib.parse as u; print(u.parse_qs(u.urlparse(sys.argv[1]).query)['code'][0])" "$LOC")
TOKEN=$(curl -s "http://127.0.0.1:$HTTP_PORT/token" -d grant_type=authorization_code --data-urlencode "code=$CODE" \
  -d redirect_uri=http://127.0.0.1:8765/callback -d client_id=demo-web-client -d client_secret=demo-client-secret \
  | python3 -c "import json,sys; print(json.load(sys.stdin)['access_token'])")
ADMIN=$($MG --config "$WORK/mailgate.toml" admin-token create bench 2>/dev/null)

drain_mailgate() {
  local start=$1
  for _ in $(seq 1 1200); do
    n=$(curl -s -H "Authorization: Bearer $ADMIN" "http://127.0.0.1:$HTTP_PORT/mailgate/v1/messages?state=queued&limit=1" \
        | python3 -c "import json,sys; v=json.load(sys.stdin); print(len(v.get('messages', v) if isinstance(v, dict) else v))")
    [ "$n" = 0 ] && break
    sleep 0.1
  done
  echo "$(( $(date +%s%N) - start ))"
}

echo
echo "| clients | Postfix accepted/s | Mailgate accepted/s | ratio | Mailgate p50 | Mailgate p99 | Postfix delivered/s | Mailgate delivered/s |"
echo "|---|---|---|---|---|---|---|---|"
for C in $CLIENTS; do
  N=$COUNT; [ "$C" = 1 ] && N=$(( COUNT / 4 ))
  t0=$(date +%s%N)
  R=$($LOADGEN "127.0.0.1:$HTTP_PORT" "$TOKEN" "$N" "$C" $SIZE)
  D=$(python3 -c "print(round($N/($(drain_mailgate "$t0")/1e9),1))")
  python3 - "$R" "$C" "${PF_RATE[$C]}" "${PF_DRAIN[$C]}" "$D" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); c, pf, pfd, d = sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5]
assert r["errors"] == 0, r
print(f"| {c} | {pf:.0f} | {r['per_second']:.0f} | {r['per_second']/pf:.2f}x | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | {pfd} | {d} |")
PY
done
