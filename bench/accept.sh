#!/usr/bin/env bash
# Acceptance and delivery throughput: Mailgate's Gmail door versus Postfix, side by side in one run
# on this machine. Both accept 10 KB messages durably (Mailgate: SQLite WAL, synchronous=FULL;
# Postfix: its fsync'd queue) and relay them to the same local smtp-sink.
#
#   ./bench/accept.sh [COUNT]        (default 2000 messages per row, a quarter for one client)
#
# Prints a markdown table for docs/performance.md. Loopback only; every loop is bounded.
# While tuning: CLIENTS="1 16" MAILGATE_ONLY=1 ./bench/accept.sh 1000 skips Postfix (the ratio
# column is then meaningless; published numbers always come from a full run).
source "$(dirname "$0")/common.sh"
COUNT=${1:-2000}
SIZE=10240
bench_setup

declare -A PF_RATE PF_DRAIN
if [ -z "${MAILGATE_ONLY:-}" ]; then
  postfix_start
  for C in $CLIENTS; do
    N=$(messages_for "$C")
    settle
    t0=$(date +%s%N)
    smtp-source -c -l $SIZE -m "$N" -s "$C" -f alice@example.com -t bench@example.org 127.0.0.1:25 >/dev/null
    PF_RATE[$C]=$(rate_since "$N" "$t0")
    PF_DRAIN[$C]=$(python3 -c "print(round($N/($(postfix_drained_after "$t0")/1e9),1))")
    log "postfix C=$C: ${PF_RATE[$C]}/s accepted, ${PF_DRAIN[$C]}/s delivered"
  done
  postfix_stop
fi

mailgate_start
echo
echo "| clients | Postfix accepted/s | Mailgate accepted/s | ratio | Mailgate p50 | Mailgate p99 | Postfix delivered/s | Mailgate delivered/s |"
echo "|---|---|---|---|---|---|---|---|"
for C in $CLIENTS; do
  N=$(messages_for "$C")
  settle
  t0=$(date +%s%N)
  R=$($LOADGEN "127.0.0.1:$HTTP_PORT" "$TOKEN" "$N" "$C" $SIZE)
  D=$(python3 -c "print(round($N/($(mailgate_drained_after "$t0")/1e9),1))")
  python3 - "$R" "$C" "${PF_RATE[$C]:-0}" "${PF_DRAIN[$C]:--}" "$D" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); c, pf, pfd, d = sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5]
assert r["errors"] == 0, r
ratio = f"{r['per_second']/pf:.2f}x" if pf else "-"
print(f"| {c} | {pf:.0f} | {r['per_second']:.0f} | {ratio} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | {pfd} | {d} |")
PY
done
