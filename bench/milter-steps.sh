#!/usr/bin/env bash
# What asking Postfix for fewer milter steps gives, measured: one Postfix
# with the C null milter (bench/nullmilter.c) on a unix socket, the milter
# restarted in mode A, then mode B, then A again..., the same `smtp-source`
# load each time, so that the two modes are measured seconds apart on the
# same Postfix (this shared machine's speed drifts over minutes). Prints
# each run's messages/s and the whole machine's CPU a message, then the
# median of B's over A's.
#
#   bench/milter-steps.sh               # nr against skip: is leaving out the
#                                       # connect and MAIL steps worth it?
#   A=nr B=min bench/milter-steps.sh    # against no step before RCPT, no headers
#   ROUNDS=5 MSGS=8000 bench/milter-steps.sh
#
# The modes are nullmilter.c's: nr (the no-reply steps greyhook's milter
# asks for), min, skip; or "all" for none (every step answered). Every
# message must be delivered, or the script fails without figures.
set -euo pipefail
shopt -s inherit_errexit
fail() { echo "FAILED: $*" >&2; exit 1; }
cd "$(dirname "$0")/.."
A=${A:-nr}
B=${B:-skip}
ROUNDS=${ROUNDS:-3}
MSGS=${MSGS:-4000}
SESSIONS=${SESSIONS:-4}
[ -x /usr/sbin/smtp-source ] || { echo "smtp-source missing: apt-get install postfix" >&2; exit 1; }
[ -f /usr/include/libmilter/mfapi.h ] || { echo "libmilter missing: apt-get install libmilter-dev" >&2; exit 1; }
for m in "$A" "$B"; do
  case $m in nr | min | skip | all) ;; *) fail "unknown mode $m (nr, min, skip or all)" ;; esac
done
work=$(mktemp -d)
chmod 755 "$work"
cc -O2 -o "$work/nullmilter" bench/nullmilter.c -lmilter -pthread
postfixes=()
milter_pid=
cleanup() {
  [ -z "$milter_pid" ] || kill "$milter_pid" 2>/dev/null || true
  for d in "${postfixes[@]}"; do postfix -c "$d/etc" stop >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT
wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; fail "nothing on port $1"; }
hz=$(getconf CLK_TCK)
source bench/postfix.sh

sock=$work/null-milter.sock
port=$(free_port)
postfix_start "$work/pf" "$port" "smtpd_milters = unix:$sock
milter_default_action = tempfail"

# milter MODE: the null milter in MODE, alone on the socket.
milter() {
  [ -z "$milter_pid" ] || { kill "$milter_pid"; wait "$milter_pid" 2>/dev/null || true; }
  rm -f "$sock"
  local arg=$1
  [ "$arg" != all ] || arg=
  "$work/nullmilter" "unix:$sock" $arg >>"$work/nullmilter.log" 2>&1 &
  milter_pid=$!
  for _ in $(seq 1 200); do [ -S "$sock" ] && break; sleep 0.05; done
  [ -S "$sock" ] || fail "the null milter did not start: $(cat "$work/nullmilter.log")"
  # Postfix's smtpd runs as `postfix`: it must be let in.
  chmod 666 "$sock"
}

# run MODE ROUND: prints "msgs_per_s machine_us_per_msg" (the null milter
# must be running in MODE).
run() {
  local mode=$1 round=$2 before t0 t1 m0 m1
  before=$(delivered "$work/pf/maillog")
  smtp_load "warm-$mode-r$round" "$port" 200
  m0=$(machine)
  t0=$(date +%s.%N)
  smtp_load "$mode-r$round" "$port" "$MSGS"
  t1=$(date +%s.%N)
  m1=$(machine)
  wait_delivered "$work/pf/maillog" $((before + 200 + MSGS)) "$mode"
  awk -v n="$MSGS" -v t="$(echo "$t1 - $t0" | bc)" -v m=$((m1 - m0)) -v hz="$hz" 'BEGIN { printf "%.0f %.1f\n", n / t, m * 1e6 / hz / n }'
}

ratios=()
printf "%-6s %-5s %10s %20s\n" round mode msgs/s "machine CPU µs/msg"
for round in $(seq 1 "$ROUNDS"); do
  milter "$A"
  out=$(run "$A" "$round")
  read -r a_rate a_cpu <<<"$out"
  printf "%-6s %-5s %10s %20s\n" "$round" "$A" "$a_rate" "$a_cpu"
  milter "$B"
  out=$(run "$B" "$round")
  read -r b_rate b_cpu <<<"$out"
  printf "%-6s %-5s %10s %20s\n" "$round" "$B" "$b_rate" "$b_cpu"
  ratios+=("$(awk -v a="$a_rate" -v b="$b_rate" -v ac="$a_cpu" -v bc="$b_cpu" 'BEGIN { printf "%.3f %.3f", b / a, bc / ac }')")
  echo "round $round: throughput $B / $A: ${ratios[-1]% *}; machine CPU a message $B / $A: ${ratios[-1]#* }"
done
median() { printf '%s\n' "${ratios[@]}" | awk -v c="$1" '{print $c}' | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
echo
echo "median of $ROUNDS rounds:"
printf "throughput, null milter in mode %s / in mode %s: %.2f\n" "$B" "$A" "$(median 1)"
printf "machine CPU a message, %s / %s: %.2f\n" "$B" "$A" "$(median 2)"
