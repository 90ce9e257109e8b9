#!/usr/bin/env bash
# Acceptance on PostgreSQL (issue 16): Postfix, Mailgate on SQLite, one Mailgate node on
# PostgreSQL and two Mailgate nodes on one PostgreSQL database, measured in ONE run on this
# machine with the same load generators as accept.sh (Gmail door, mailgate-loadgen) and smtp.sh
# (smtp-source into the SMTP relay listener), 1/16/64 sessions.
#
#   ./bench/postgres.sh [COUNT]     (default 2000 messages per row, a quarter for one session)
#
# CONFIGS (default "postfix sqlite pg1 pg2") and DOORS (default "gmail smtp") narrow a run while
# working on one row; the table then shows only what was measured. PG_STATEMENTS=1 prints, after
# each PostgreSQL row, the CPU used by each program (bench/cpu.py) and the statements that took
# the server's time (pg_stat_statements, which must
# be in the server's shared_preload_libraries).
#
# PostgreSQL: the server at PG_SERVER (default postgres://postgres@127.0.0.1:5432/postgres, the
# machines' trust-auth server); each configuration gets a fresh database `mailgate_bench`,
# dropped at the end. Every acceptance is durable: the script refuses to run unless the server
# says `synchronous_commit = on` (and `fsync = on`). Two nodes: every row's sessions are split
# between the nodes (one session: all on the first), each node's load generator started at the
# same moment; the rate is all messages over the wall time until the last one was accepted. Both
# nodes relay to the same sink as the single ones. Prints a markdown table for
# docs/performance.md. Loopback only; every loop is bounded.
source "$(dirname "$0")/common.sh"
COUNT=${1:-2000}
SIZE=10240
PG_SERVER=${PG_SERVER:-postgres://postgres@127.0.0.1:5432/postgres}
PG_DB=mailgate_bench
PG_URL=${PG_SERVER%/*}/$PG_DB
HTTP_PORT_B=$((HTTP_PORT + 1))
SMTP_RELAY_PORT_B=$((SMTP_RELAY_PORT + 1))

pg() { psql -X -q -A -t -v ON_ERROR_STOP=1 -d "$1" -c "$2"; }
sync_commit=$(pg "$PG_SERVER" "SHOW synchronous_commit")
fsync=$(pg "$PG_SERVER" "SHOW fsync")
log "PostgreSQL: synchronous_commit = $sync_commit, fsync = $fsync"
if [ "$sync_commit" != on ] || [ "$fsync" != on ]; then
  log "refusing to measure: acceptances would not be durable"
  exit 1
fi
fresh_db() {
  pg "$PG_SERVER" "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)"
  pg "$PG_SERVER" "CREATE DATABASE $PG_DB"
}

bench_setup
trap 'bench_cleanup; nodes_stop; pg "$PG_SERVER" "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" || true' EXIT

# The second node of a two-node run (the first is common.sh's mailgate_start): same database,
# its own data directory, ports and node id.
NODE_B_PID=
node_b_start() {
  cat >"$WORK/node-b.toml" <<TOML
data_dir = "$WORK/node-b"
[node]
id = "bench-b"
[store]
url = "$PG_URL"
[http]
listen = "127.0.0.1:$HTTP_PORT_B"
[smtp]
relay_listen = "127.0.0.1:$SMTP_RELAY_PORT_B"
submission_listen = "127.0.0.1:$((SMTP_RELAY_PORT_B + 10))"
[log]
level = "warn"
[relay]
workers = ${RELAY_WORKERS:-4}
[limits]
http_max_connections_per_ip = 1024
smtp_max_connections_per_ip = 1024
TOML
  $MG --config "$WORK/node-b.toml" serve >"$WORK/node-b.out" 2>&1 &
  NODE_B_PID=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$HTTP_PORT_B/healthz" >/dev/null && break; sleep 0.1; done
  curl -sf "http://127.0.0.1:$HTTP_PORT_B/healthz" >/dev/null || { log "node b did not start:"; tail -5 "$WORK/node-b.out" >&2; exit 1; }
}
nodes_stop() {
  mailgate_stop
  [ -n "${NODE_B_PID:-}" ] || return 0
  kill "$NODE_B_PID" 2>/dev/null || true
  wait "$NODE_B_PID" 2>/dev/null || true
  NODE_B_PID=
}

declare -A RESULT

# The Gmail door: N messages over C sessions, split over the nodes given (HTTP ports); prints
# messages per second over the wall time.
gmail_row() {
  local n=$1 c=$2
  shift 2
  local ports=("$@") k=$#
  [ "$c" -lt "$k" ] && k=$c
  local t0 pids=() i
  t0=$(date +%s%N)
  for i in $(seq 0 $((k - 1))); do
    $LOADGEN "127.0.0.1:${ports[$i]}" "$TOKEN" $((n / k)) $((c / k)) $SIZE >"$WORK/loadgen.$i" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  local rate
  rate=$(rate_since "$n" "$t0")
  for i in $(seq 0 $((k - 1))); do
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert r['errors']==0, r" "$WORK/loadgen.$i"
  done
  echo "$rate"
}

# The SMTP relay listener: the same split with smtp-source.
smtp_row() {
  local n=$1 c=$2
  shift 2
  local ports=("$@") k=$#
  [ "$c" -lt "$k" ] && k=$c
  local t0 pids=() i
  t0=$(date +%s%N)
  for i in $(seq 0 $((k - 1))); do
    smtp-source -c -l "$SIZE" -m $((n / k)) -s $((c / k)) -f alice@example.com -t bench@example.org \
      127.0.0.1:"${ports[$i]}" >"$WORK/smtp-source.$i" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do
    wait "$p" || { log "smtp-source failed:"; tail -5 "$WORK"/smtp-source.* >&2; exit 1; }
  done
  rate_since "$n" "$t0"
}

CONFIGS=${CONFIGS:-"postfix sqlite pg1 pg2"}
DOORS=${DOORS:-"gmail smtp"}
wanted() { [[ " $1 " == *" $2 "* ]]; }

# PG_STATEMENTS=1: the server's statistics are reset before a PostgreSQL row and its top
# statements by total time printed after it (to stderr, with the row's name).
pg_statements_reset() {
  [ -n "${PG_STATEMENTS:-}" ] && [ "$1" != sqlite ] || return 0
  pg "$PG_URL" "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset()" >/dev/null
  bench/cpu.py snapshot "$WORK/cpu.json"
}
pg_statements_print() {
  [ -n "${PG_STATEMENTS:-}" ] && [ "$1" != sqlite ] || return 0
  log "$1 $2 C=$3: $(bench/cpu.py diff "$WORK/cpu.json") (the row and the queue's drain)"
  log "$1 $2 C=$3: statements by total time (calls, total ms, rows, query)"
  psql -X -q -A -F ' | ' -t -d "$PG_URL" -c "SELECT calls, round(total_exec_time::numeric, 1), rows, plans, round(total_plan_time::numeric, 1),
      left(regexp_replace(query, '\s+', ' ', 'g'), 140) FROM pg_stat_statements
      WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
      ORDER BY total_exec_time DESC LIMIT 25" >&2
  pg "$PG_URL" "SELECT 'commits ' || xact_commit || ', rollbacks ' || xact_rollback FROM pg_stat_database WHERE datname = current_database()" >&2
}

# PERF_DIR=DIR: every row is profiled with `perf record -a` (every process on the machine, CPU
# clock, call graphs) into DIR/<config>-<door>-<C>.data, from the row's start until its last
# acceptance (not the queue's drain); read with `perf report -i FILE --sort comm,dso,sym`.
PERF_PID=
perf_start() {
  [ -n "${PERF_DIR:-}" ] || return 0
  mkdir -p "$PERF_DIR"
  perf record -q -e cpu-clock -F 999 -a -g -o "$PERF_DIR/$1-$2-$3.data" >/dev/null 2>&1 &
  PERF_PID=$!
  sleep 0.5
}
perf_stop() {
  [ -n "$PERF_PID" ] || return 0
  kill -INT "$PERF_PID" 2>/dev/null || true
  wait "$PERF_PID" 2>/dev/null || true
  PERF_PID=
}

# One configuration: every client count, the doors asked for; RESULT[config,door,C].
measure() {
  local config=$1
  shift
  local http=() relay=()
  if [ "$config" = pg2 ]; then
    http=("$HTTP_PORT" "$HTTP_PORT_B")
    relay=("$SMTP_RELAY_PORT" "$SMTP_RELAY_PORT_B")
  else
    http=("$HTTP_PORT")
    relay=("$SMTP_RELAY_PORT")
  fi
  # Unmeasured warm-up of EVERY node through both doors (1,000 messages over the relay
  # listeners, 400 through the Gmail door, split between the nodes), as Postfix gets 1,000: each
  # node's pooled connections opened and their statements prepared and past PostgreSQL's first
  # custom plans before the first measured row (a node measured cold spent a tenth of its
  # database's time planning).
  local k=${#relay[@]} i pids=()
  for i in $(seq 0 $((k - 1))); do
    smtp-source -l "$SIZE" -m $((1000 / k)) -s $((16 / k)) -f alice@example.com -t bench@example.org \
      127.0.0.1:"${relay[$i]}" >/dev/null &
    pids+=($!)
    $LOADGEN "127.0.0.1:${http[$i]}" "$TOKEN" $((400 / k)) $((16 / k)) $SIZE >/dev/null &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i"; done
  mailgate_drained_after "$(date +%s%N)" >/dev/null
  for C in $CLIENTS; do
    N=$(messages_for "$C")
    if wanted "$DOORS" gmail; then
      settle
      pg_statements_reset "$config"
      perf_start "$config" gmail "$C"
      RESULT[$config,gmail,$C]=$(gmail_row "$N" "$C" "${http[@]}")
      perf_stop
      mailgate_drained_after "$(date +%s%N)" >/dev/null
      pg_statements_print "$config" gmail "$C"
      log "$config C=$C: gmail ${RESULT[$config,gmail,$C]}/s"
    fi
    if wanted "$DOORS" smtp; then
      settle
      pg_statements_reset "$config"
      perf_start "$config" smtp "$C"
      RESULT[$config,smtp,$C]=$(smtp_row "$N" "$C" "${relay[@]}")
      perf_stop
      mailgate_drained_after "$(date +%s%N)" >/dev/null
      pg_statements_print "$config" smtp "$C"
      log "$config C=$C: smtp ${RESULT[$config,smtp,$C]}/s"
    fi
  done
}

declare -A PF
if wanted "$CONFIGS" postfix; then
  postfix_measure
fi

# The first node's config on PostgreSQL (the second's is node_b_start's).
NODE_A_CONFIG=$'[node]\nid = "bench-a"\n[store]\nurl = "'"$PG_URL"$'"'

if wanted "$CONFIGS" sqlite; then
  log "Mailgate on SQLite"
  MG_DATA=$WORK/sqlite mailgate_start
  measure sqlite
  nodes_stop
fi

if wanted "$CONFIGS" pg1; then
  log "one Mailgate node on PostgreSQL"
  fresh_db
  MG_DATA=$WORK/pg1 MG_EXTRA_CONFIG=$NODE_A_CONFIG mailgate_start
  measure pg1
  nodes_stop
fi

if wanted "$CONFIGS" pg2; then
  log "two Mailgate nodes on one PostgreSQL database"
  fresh_db
  MG_DATA=$WORK/pg2 MG_EXTRA_CONFIG=$NODE_A_CONFIG mailgate_start
  node_b_start
  $MG --database-url "$PG_URL" status >&2
  measure pg2
  nodes_stop
fi

# A column or ratio that was not measured in this run shows "-".
echo
echo "| door | sessions | Postfix accepted/s | SQLite accepted/s | PostgreSQL, 1 node | PostgreSQL, 2 nodes | SQLite / Postfix | PG 1 node / Postfix | PG 2 nodes / Postfix |"
echo "|---|---|---|---|---|---|---|---|---|"
for door in gmail smtp; do
  wanted "$DOORS" "$door" || continue
  for C in $CLIENTS; do
    python3 - "$door" "$C" "${PF[$C]:-}" "${RESULT[sqlite,$door,$C]:-}" "${RESULT[pg1,$door,$C]:-}" "${RESULT[pg2,$door,$C]:-}" <<'PY'
import sys
door, c = sys.argv[1], sys.argv[2]
pf, sq, p1, p2 = (float(v) if v else None for v in sys.argv[3:7])
name = "Gmail messages.send" if door == "gmail" else "SMTP relay listener"
num = lambda v: "-" if v is None else f"{v:.0f}"
ratio = lambda v: "-" if v is None or pf is None else f"{v/pf:.2f}x"
print(f"| {name} | {c} | {num(pf)} | {num(sq)} | {num(p1)} | {num(p2)} | {ratio(sq)} | {ratio(p1)} | {ratio(p2)} |")
PY
  done
done
