# Shared by the benchmark scripts (sourced, not run): Postfix from Debian's packages as the peer,
# one smtp-sink as the common destination, and a Mailgate server with the same durability
# (SQLite WAL, synchronous=FULL) relaying to that sink. Loopback only; every loop is bounded.
#
# RELAY_WORKERS sets Mailgate's `relay.workers` (default 4, the shipped default).
# A script sets COUNT, SIZE and CLIENTS, then calls: bench_setup; postfix_start; ...;
# postfix_stop; mailgate_start; ... Cleanup runs on exit.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORK=$(mktemp -d /tmp/mailgate-bench.XXXXXX)
SINK_PORT=${SINK_PORT:-2525}
HTTP_PORT=${HTTP_PORT:-7180}
SMTP_RELAY_PORT=${SMTP_RELAY_PORT:-7625}
CLIENTS=${CLIENTS:-"1 16 64"}
MG=${MG:-target/release/mailgate}
LOADGEN=${LOADGEN:-target/release/mailgate-loadgen}
log() { printf '==> %s\n' "$*" >&2; }

# Messages per row: a quarter for one client (it is the slowest row).
messages_for() { if [ "$1" = 1 ]; then echo $((COUNT / 4)); else echo "$COUNT"; fi; }

# Before each measured row: the kernel writes back what the previous row left dirty (gigabytes
# after a long row), so that neither system's fsyncs compete with the other's leftovers.
settle() { sync; sleep 1; }

# Prints N / seconds since START (nanoseconds), one decimal.
rate_since() { python3 -c "print(round($1/(($(date +%s%N)-$2)/1e9),1))"; }

bench_cleanup() {
  [ -n "${MG_PID:-}" ] && kill "$MG_PID" 2>/dev/null || true
  [ -n "${SINK_PID:-}" ] && kill "$SINK_PID" 2>/dev/null || true
  postfix stop >/dev/null 2>&1 || true
}

bench_setup() {
  if ! command -v smtp-source >/dev/null 2>&1 && [ ! -x /usr/sbin/smtp-source ]; then
    log "installing postfix (smtp-source, smtp-sink) from Debian's packages"
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
  fi
  export PATH="$PATH:/usr/sbin"
  # BENCH_NO_BUILD=1: measure the binaries MG and LOADGEN name as they are (copies taken before
  # a run, so that a build in the shared tree cannot change them mid-run).
  if [ -z "${BENCH_NO_BUILD:-}" ]; then
    log "building release binaries"
    cargo build --release -q -p mailgate -p mailgate-loadgen
  fi
  trap bench_cleanup EXIT
  log "smtp-sink on 127.0.0.1:$SINK_PORT (the common destination)"
  smtp-sink -u postfix 127.0.0.1:"$SINK_PORT" 256 &
  SINK_PID=$!
}

# The system Postfix, reconfigured: loopback only, relaying everything to the sink.
postfix_start() {
  log "configuring Postfix: loopback only, relaying everything to the sink"
  # Debian's "No configuration" install leaves no main.cf.
  [ -f /etc/postfix/main.cf ] || cp /usr/share/postfix/main.cf.debian /etc/postfix/main.cf
  postconf -e "myhostname = bench.localdomain" "mydomain = localdomain" "myorigin = localdomain"
  postconf -e "inet_interfaces = 127.0.0.1" "inet_protocols = ipv4" "mydestination =" \
    "relayhost = [127.0.0.1]:$SINK_PORT" "mynetworks = 127.0.0.0/8" \
    "smtpd_recipient_restrictions = permit_mynetworks, reject" "maillog_file = /var/log/postfix-bench.log" \
    "default_process_limit = 200" "smtpd_client_connection_count_limit = 0" \
    "smtpd_client_connection_rate_limit = 0" "smtpd_client_message_rate_limit = 0" \
    "smtp_tls_security_level = none" "compatibility_level = 3.6"
  postfix stop >/dev/null 2>&1 || true
  postfix start >/dev/null 2>&1
  sleep 1
}

postfix_stop() { postfix stop >/dev/null 2>&1 || true; }

# Waits (at most 60 s) until Postfix's queue is empty; prints nanoseconds since START.
postfix_drained_after() {
  for _ in $(seq 1 600); do
    if postqueue -p 2>/dev/null | grep -q "Mail queue is empty"; then break; fi
    sleep 0.1
  done
  echo "$(($(date +%s%N) - $1))"
}

# Postfix's acceptance rate at every client count of CLIENTS into the associative array PF
# (declared by the caller: `declare -A PF`): started, warmed with 1,000 messages, each count
# measured after a settle, stopped (bench/compare.sh, bench/postgres.sh).
postfix_measure() {
  postfix_start
  smtp-source -l "$SIZE" -m 1000 -s 16 -f alice@example.com -t bench@example.org 127.0.0.1:25 >/dev/null
  postfix_drained_after "$(date +%s%N)" >/dev/null
  local C N t0
  for C in $CLIENTS; do
    N=$(messages_for "$C")
    settle
    # PG_STATEMENTS=1 (bench/postgres.sh): the CPU of the row and its drain, by program, as for
    # Mailgate's rows.
    [ -z "${PG_STATEMENTS:-}" ] || bench/cpu.py snapshot "$WORK/cpu-postfix.json"
    t0=$(date +%s%N)
    smtp-source -c -l "$SIZE" -m "$N" -s "$C" -f alice@example.com -t bench@example.org 127.0.0.1:25 >/dev/null
    PF[$C]=$(rate_since "$N" "$t0")
    log "postfix C=$C: ${PF[$C]}/s accepted"
    if [ -n "${PG_STATEMENTS:-}" ]; then
      postfix_drained_after "$t0" >/dev/null
      log "postfix C=$C: $(bench/cpu.py diff "$WORK/cpu-postfix.json") (the row and the queue's drain)"
    fi
  done
  postfix_stop
}

# Mailgate on the demo organisation with limits out of the way and the sink as smarthost; sets
# MG_PID, ADMIN (admin token) and TOKEN (a Gmail-scope user access token for alice@example.com).
# MG_EXTRA_CONFIG is appended to its config file (bench/postgres.sh: `[store] url`, `[node] id`);
# without it the store is SQLite in MG_DATA.
mailgate_start() {
  log "starting $MG (${MG_EXTRA_CONFIG:+PostgreSQL, }durable acceptance, relaying to the same sink)"
  local data=${MG_DATA:-$WORK/mailgate}
  cat >"$WORK/mailgate.toml" <<TOML
data_dir = "$data"
[http]
listen = "127.0.0.1:$HTTP_PORT"
[smtp]
relay_listen = "127.0.0.1:$SMTP_RELAY_PORT"
[log]
level = "warn"
[relay]
workers = ${RELAY_WORKERS:-4}
# Every benchmark client is 127.0.0.1: per-IP caps out of the way, as Postfix exempts
# \$mynetworks (smtpd_client_event_limit_exceptions) from its own.
[limits]
http_max_connections_per_ip = 1024
smtp_max_connections_per_ip = 1024
${MG_EXTRA_CONFIG:-}
TOML
  $MG --config "$WORK/mailgate.toml" apply -f docs/examples/org.yaml >/dev/null
  cat >"$WORK/bench.yaml" <<YAML
smarthosts:
  - {name: sink, host: 127.0.0.1, port: $SINK_PORT, tls: none}
limits:
  messages_per_day: 100000000
  recipients_per_day: 100000000
  rate_units_per_minute: 100000000000
  concurrent_sends: 100000
YAML
  $MG --config "$WORK/mailgate.toml" apply -f "$WORK/bench.yaml" >/dev/null
  $MG --config "$WORK/mailgate.toml" serve >"$WORK/mailgate.out" 2>&1 &
  MG_PID=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null && break; sleep 0.1; done
  ADMIN=$($MG --config "$WORK/mailgate.toml" admin-token create bench 2>/dev/null)
  # A user access token through the authorization-code flow (the demo client has a secret).
  local loc code
  # The sign-in form carries an anti-CSRF token bound to a cookie: fetch the page first.
  local page csrf
  page=$(curl -s -c "$WORK/consent.cookies" -G "http://127.0.0.1:$HTTP_PORT/o/oauth2/auth" \
    --data-urlencode client_id=demo-web-client --data-urlencode redirect_uri=http://127.0.0.1:8765/callback \
    --data-urlencode response_type=code --data-urlencode scope=https://www.googleapis.com/auth/gmail.send)
  csrf=$(printf '%s' "$page" | sed -n 's/.*name="csrf_token" value="\([^"]*\)".*/\1/p')
  loc=$(curl -s -b "$WORK/consent.cookies" -o /dev/null -w '%{redirect_url}' -X POST "http://127.0.0.1:$HTTP_PORT/o/oauth2/auth" \
    --data-urlencode client_id=demo-web-client --data-urlencode redirect_uri=http://127.0.0.1:8765/callback \
    --data-urlencode response_type=code --data-urlencode scope=https://www.googleapis.com/auth/gmail.send \
    --data-urlencode email=alice@example.com --data-urlencode "password=correct horse battery staple" \
    --data-urlencode "csrf_token=$csrf")
  code=$(python3 -c "import sys,urllib.parse as u; print(u.parse_qs(u.urlparse(sys.argv[1]).query)['code'][0])" "$loc")
  TOKEN=$(curl -s "http://127.0.0.1:$HTTP_PORT/token" -d grant_type=authorization_code --data-urlencode "code=$code" \
    -d redirect_uri=http://127.0.0.1:8765/callback -d client_id=demo-web-client -d client_secret=demo-client-secret |
    python3 -c "import json,sys; print(json.load(sys.stdin)['access_token'])")
}

# Stops the Mailgate that mailgate_start started (a script measuring two builds starts the next
# one with another MG and MG_DATA).
mailgate_stop() {
  [ -n "${MG_PID:-}" ] || return 0
  kill "$MG_PID" 2>/dev/null || true
  wait "$MG_PID" 2>/dev/null || true
  MG_PID=
}

# Waits (at most 120 s) until no message is queued or deferred in Mailgate; prints nanoseconds
# since START.
mailgate_drained_after() {
  local n
  for _ in $(seq 1 1200); do
    n=$(curl -s -H "Authorization: Bearer $ADMIN" "http://127.0.0.1:$HTTP_PORT/mailgate/v1/messages?state=queued&limit=1" |
      python3 -c "import json,sys; v=json.load(sys.stdin); print(len(v.get('messages', v) if isinstance(v, dict) else v))")
    [ "$n" = 0 ] && break
    sleep 0.1
  done
  echo "$(($(date +%s%N) - $1))"
}
