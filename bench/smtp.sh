#!/usr/bin/env bash
# SMTP acceptance: Postfix's own load generator, smtp-source, into Mailgate's SMTP relay listener
# versus into Postfix, side by side in one run, same message size and concurrency. Both accept
# durably (Mailgate: SQLite WAL, synchronous=FULL; Postfix: its fsync'd queue) and relay to the
# same local smtp-sink. smtp-source opens a new session per message (as most applications do).
#
#   ./bench/smtp.sh [COUNT] [SIZE]     (default 2000 messages per row, 10240 bytes)
#
# Each server first takes WARMUP messages (default 1000, 16 sessions) that are not measured, and
# the measured rows start once they are delivered: both are measured in steady state (Postfix with
# its processes running and queue directories warm, Mailgate with its log file at its working
# size), not on the first messages after a start.
#
# Prints a markdown table for docs/performance.md. Loopback only; every loop is bounded.
source "$(dirname "$0")/common.sh"
COUNT=${1:-2000}
SIZE=${2:-10240}
bench_setup

WARMUP=${WARMUP:-1000}
declare -A PF_RATE PF_DRAIN
postfix_start
if [ "$WARMUP" -gt 0 ]; then
  log "postfix warm-up: $WARMUP messages"
  smtp-source -l "$SIZE" -m "$WARMUP" -s 16 -f alice@example.com -t bench@example.org 127.0.0.1:25 >/dev/null
  postfix_drained_after "$(date +%s%N)" >/dev/null
fi
for C in $CLIENTS; do
  N=$(messages_for "$C")
  settle
  t0=$(date +%s%N)
  smtp-source -c -l "$SIZE" -m "$N" -s "$C" -f alice@example.com -t bench@example.org 127.0.0.1:25 >/dev/null
  PF_RATE[$C]=$(rate_since "$N" "$t0")
  PF_DRAIN[$C]=$(python3 -c "print(round($N/($(postfix_drained_after "$t0")/1e9),1))")
  log "postfix C=$C: ${PF_RATE[$C]}/s accepted, ${PF_DRAIN[$C]}/s delivered"
done
postfix_stop

mailgate_start
if [ "$WARMUP" -gt 0 ]; then
  log "mailgate warm-up: $WARMUP messages"
  smtp-source -l "$SIZE" -m "$WARMUP" -s 16 -f alice@example.com -t bench@example.org \
    127.0.0.1:"$SMTP_RELAY_PORT" >/dev/null
  mailgate_drained_after "$(date +%s%N)" >/dev/null
fi
echo
echo "| clients | size | Postfix accepted/s | Mailgate accepted/s | ratio | Postfix delivered/s | Mailgate delivered/s |"
echo "|---|---|---|---|---|---|---|"
for C in $CLIENTS; do
  N=$(messages_for "$C")
  settle
  t0=$(date +%s%N)
  smtp-source -c -l "$SIZE" -m "$N" -s "$C" -f alice@example.com -t bench@example.org \
    127.0.0.1:"$SMTP_RELAY_PORT" >"$WORK/smtp-source.out" 2>&1 ||
    { log "smtp-source against Mailgate failed:"; tail -5 "$WORK/smtp-source.out" >&2; exit 1; }
  RATE=$(rate_since "$N" "$t0")
  D=$(python3 -c "print(round($N/($(mailgate_drained_after "$t0")/1e9),1))")
  log "mailgate C=$C: $RATE/s accepted, $D/s delivered"
  python3 -c "pf=${PF_RATE[$C]}; mg=$RATE; print(f'| $C | $SIZE | {pf:.0f} | {mg:.0f} | {mg/pf:.2f}x | ${PF_DRAIN[$C]} | $D |')"
done
