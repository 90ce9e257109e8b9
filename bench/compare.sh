#!/usr/bin/env bash
# Did a change move acceptance? Two builds of Mailgate (BEFORE = a git revision, AFTER = this
# checkout) and Postfix, measured in ONE run on this machine, with the same load generators as
# accept.sh (Gmail door, mailgate-loadgen) and smtp.sh (smtp-source into the SMTP relay listener).
#
#   ./bench/compare.sh BEFORE_REV [COUNT]     (default 2000 messages per row, a quarter for one client)
#
# BEFORE_REV is built in a git worktree under /tmp (its own target directory, kept between runs).
# Rows alternate builds per load (before, after, before, after) so that a drift of the machine
# during the run shows as a difference between the two rounds of the same build, not as a
# difference between the builds. Prints a markdown table for docs/performance.md. Loopback only;
# every loop is bounded.
source "$(dirname "$0")/common.sh"
BEFORE_REV=${1:?usage: bench/compare.sh BEFORE_REV [COUNT]}
COUNT=${2:-2000}
SIZE=10240
ROUNDS=${ROUNDS:-2}

BEFORE_DIR=${BEFORE_DIR:-/tmp/mailgate-bench-before}
BEFORE_SHA=$(git rev-parse --verify "$BEFORE_REV^{commit}")
if [ "$(git -C "$BEFORE_DIR" rev-parse HEAD 2>/dev/null)" != "$BEFORE_SHA" ]; then
  rm -rf "$BEFORE_DIR"
  git worktree prune
  git worktree add --detach "$BEFORE_DIR" "$BEFORE_SHA" >/dev/null
fi
log "building the before binary ($BEFORE_REV = ${BEFORE_SHA:0:10})"
(cd "$BEFORE_DIR" && CARGO_TARGET_DIR=$BEFORE_DIR/target cargo build --release -q -p mailgate)
bench_setup
AFTER_MG=$MG
BEFORE_MG=$BEFORE_DIR/target/release/mailgate

declare -A PF
postfix_measure

# One measured build: Gmail door then SMTP relay listener, every client count; RESULT[build,door,C]
# collects each round's rate.
declare -A RESULT
measure() {
  local build=$1 round=$2
  if [ "$build" = before ]; then MG=$BEFORE_MG; else MG=$AFTER_MG; fi
  MG_DATA=$WORK/$build-$round mailgate_start
  smtp-source -l "$SIZE" -m 1000 -s 16 -f alice@example.com -t bench@example.org \
    127.0.0.1:"$SMTP_RELAY_PORT" >/dev/null
  mailgate_drained_after "$(date +%s%N)" >/dev/null
  for C in $CLIENTS; do
    N=$(messages_for "$C")
    settle
    R=$($LOADGEN "127.0.0.1:$HTTP_PORT" "$TOKEN" "$N" "$C" $SIZE)
    RESULT[$build,gmail,$C]+="$(python3 -c "import json,sys; r=json.loads(sys.argv[1]); assert r['errors']==0, r; print(round(r['per_second']))" "$R") "
    mailgate_drained_after "$(date +%s%N)" >/dev/null
    settle
    t0=$(date +%s%N)
    smtp-source -c -l "$SIZE" -m "$N" -s "$C" -f alice@example.com -t bench@example.org \
      127.0.0.1:"$SMTP_RELAY_PORT" >"$WORK/smtp-source.out" 2>&1 ||
      { log "smtp-source against $MG failed:"; tail -5 "$WORK/smtp-source.out" >&2; exit 1; }
    RESULT[$build,smtp,$C]+="$(python3 -c "print(round($(rate_since "$N" "$t0")))") "
    mailgate_drained_after "$(date +%s%N)" >/dev/null
    log "$build round $round C=$C: gmail ${RESULT[$build,gmail,$C]}, smtp ${RESULT[$build,smtp,$C]}"
  done
  mailgate_stop
}
for round in $(seq 1 "$ROUNDS"); do
  measure before "$round"
  measure after "$round"
done

echo
echo "| door | clients | Postfix accepted/s | before accepted/s (each round) | after accepted/s (each round) | after / before (means) | after / Postfix |"
echo "|---|---|---|---|---|---|---|"
for door in gmail smtp; do
  for C in $CLIENTS; do
    python3 - "$door" "$C" "${PF[$C]}" "${RESULT[before,$door,$C]}" "${RESULT[after,$door,$C]}" <<'PY'
import sys
door, c, pf, before, after = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4].split(), sys.argv[5].split()
b = sum(map(float, before)) / len(before)
a = sum(map(float, after)) / len(after)
name = "Gmail messages.send" if door == "gmail" else "SMTP relay listener"
print(f"| {name} | {c} | {pf:.0f} | {', '.join(before)} | {', '.join(after)} | {a/b:.2f} | {a/pf:.2f}x |")
PY
  done
done
