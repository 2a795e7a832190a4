#!/usr/bin/env bash
# Messages through `greyhook smtp` relaying to Postfix against the same
# messages straight to Postfix, and Postfix with greyhook as its milter;
# Postfix with a milter that decides nothing (bench/nullmilter.c, on C
# libmilter: the peer greyhook's milter is measured against, and the most
# any milter path asking for as much can reach here); and Postfix's own
# before-queue proxy (a Postfix whose smtpd relays each client's dialogue to
# the same next hop with `smtpd_proxy_filter`, the client's 250 the next
# hop's: `greyhook smtp`'s work without a filter, by the peer it sits
# beside), whose whole instance's CPU a message is the peer figure for
# greyhook's. And the floor: bench/nullrelay.c, the same relay dialogue
# (the same writes and reads to the client and the next hop, the same
# next-hop pool) in one C epoll loop that does nothing else, no filter, no
# store, no checks: what any relay of this load costs on this machine, of
# which the kernel's share (system calls, wake-ups, TCP) is most.
# Postfix's own smtp-source is the client. Prints messages/s, greyhook's
# CPU per message (and its user part), the whole machine's CPU per message,
# and greyhook's context switches per message (voluntary/involuntary), with
# ratios.
#
# greyhook runs the reference filter with delay=0 and auto_whitelist_after=0,
# and every message has its own recipient (a new triplet), so every message
# does the full work: filter calls, a record written, the relay. (Until the
# thirty-third session auto-whitelisting was on: from each run's sixth
# message on, the client was auto-whitelisted and no record was written.)
# The script checks the filter's own counts for it, and every message must
# be delivered, or it fails without figures. Postfix delivers to `discard`, so the MTA's own cost stays small.
#
#   bench/smtp-vs-postfix.sh                 # 4 sessions x 4000 messages
#   SESSIONS=8 MSGS=10000 bench/smtp-vs-postfix.sh
#   MILTER=unix bench/smtp-vs-postfix.sh     # the milter on a unix socket (default: TCP)
#   HOP=unix bench/smtp-vs-postfix.sh        # greyhook smtp relays to Postfix's smtpd on a
#                                            # unix socket (master.cf `unix` service; default: TCP)
#   ROUNDS=5 bench/smtp-vs-postfix.sh        # rounds of the six paths (default 3), then medians
#   GH_SET='identity=["network"]' bench/smtp-vs-postfix.sh   # no SPF lookups
#   NULL_NR=1 bench/smtp-vs-postfix.sh       # the null milter asks for the no-reply steps too
#   NULL_MIN=1 bench/smtp-vs-postfix.sh      # ... and for no connect, HELO, MAIL or header step:
#                                            # RCPT and end of message only, every milter's ceiling
#   GH_WRAP='valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file=/tmp/cg.smtp' \
#     MSGS=300 bench/smtp-vs-postfix.sh      # greyhook smtp under a profiler (bench/instructions.sh sum)
#   GH_MILTER_WRAP=...                       # the same for the milter's greyhook
#   NR_WRAP=...                              # the same for the null relay
#   GH_WRAP='strace -f -c -o /tmp/st.smtp' MSGS=1000 bench/smtp-vs-postfix.sh   # its system calls
#   GH_BIN=target/release-lto/greyhook bench/smtp-vs-postfix.sh   # another build of greyhook
set -euo pipefail
# A failed step inside $(...) must stop the script too: no figures from a
# failed run.
shopt -s inherit_errexit
fail() { echo "FAILED: $*" >&2; exit 1; }
cd "$(dirname "$0")/.."
SESSIONS=${SESSIONS:-4}
MSGS=${MSGS:-4000}
ROUNDS=${ROUNDS:-3}

[ -x /usr/sbin/smtp-source ] || { echo "smtp-source missing: apt-get install postfix" >&2; exit 1; }
[ -f /usr/include/libmilter/mfapi.h ] || { echo "libmilter missing (the null milter is built on it): apt-get install libmilter-dev" >&2; exit 1; }
# GH_BIN: another greyhook binary to measure (default: this tree's release
# build, built first).
if [ -z "${GH_BIN:-}" ]; then
  cargo build --release -q -p greyhook
  GH_BIN=target/release/greyhook
fi
work=$(mktemp -d)
chmod 755 "$work"
cc -O2 -o "$work/nullmilter" bench/nullmilter.c -lmilter -pthread
cc -O2 -o "$work/nullrelay" bench/nullrelay.c
pids=()
postfixes=()
cleanup() {
  # A wrapper that runs greyhook as its child (strace) does not pass the
  # signal on: greyhook is stopped itself, then the wrapper.
  for p in "${pids[@]}"; do pkill -TERM -P "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
  # A profiler writes its output as greyhook exits.
  if [ -n "${GH_WRAP:-}${GH_MILTER_WRAP:-}" ]; then for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done; fi
  for d in "${postfixes[@]}"; do postfix -c "$d/etc" stop >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Polls (every 50 ms) before a server counts as not started: 10 s, or 5
# minutes under GH_WRAP's profiler, where greyhook takes minutes to start.
start_polls=200; [ -z "${GH_WRAP:-}${GH_MILTER_WRAP:-}" ] || start_polls=6000
wait_port() { for _ in $(seq 1 "$start_polls"); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "nothing on port $1" >&2; exit 1; }
# wait_milter ADDR: until the milter at inet:HOST:PORT or unix:PATH listens.
wait_milter() {
  case $1 in
    unix:*)
      for _ in $(seq 1 "$start_polls"); do [ -S "${1#unix:}" ] && return 0; sleep 0.05; done; echo "no socket ${1#unix:}" >&2; exit 1 ;;
    *) wait_port "${1##*:}" ;;
  esac
}
# ticks PID: "user+system user" clock ticks of the process so far.
ticks() { awk '{print $14 + $15, $14}' "/proc/$1/stat"; }
# switches PID: "voluntary involuntary" context switches of all its threads
# so far (a thread that waits for the peer switches voluntarily; one the
# scheduler preempts on a busy machine, involuntarily).
switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/^voluntary_ctxt_switches/ {v += $2} /^nonvoluntary_ctxt_switches/ {n += $2} END {print v + 0, n + 0}'; }
# instance_ticks MASTER_PID: "user+system user" clock ticks of a Postfix
# instance so far: its master, the children it has now (smtpd, anvil,
# trivial-rewrite, postlogd), and the children it has reaped (an smtpd
# exits after max_use sessions).
instance_ticks() {
  local p t=0 u=0 a b
  read -r a b < <(awk '{print $14 + $15 + $16 + $17, $14 + $16}' "/proc/$1/stat")
  t=$a u=$b
  for p in $(pgrep -P "$1"); do
    read -r a b < <(awk '{print $14 + $15, $14}' "/proc/$p/stat" 2>/dev/null || echo "0 0")
    t=$((t + a)) u=$((u + b))
  done
  echo "$t $u"
}
hz=$(getconf CLK_TCK)

source bench/postfix.sh

# cpu_of PID | pf:MASTER_PID, switches_of ...: a process's, or a Postfix
# instance's (whose switches are not counted: "0 0").
cpu_of() { case $1 in pf:*) instance_ticks "${1#pf:}" ;; *) ticks "$1" ;; esac; }
switches_of() { case $1 in pf:*) echo "0 0" ;; *) switches "$1" ;; esac; }

# send NAME PORT MAILLOG [GREYHOOK_PID | pf:MASTER_PID]: prints "NAME msgs_per_s greyhook_us_per_msg machine_us_per_msg".
# Every message has its own recipient (smtp-source -N numbers them from 1,
# so the round is in the address too), so every message is a new triplet: the filter's first-sight path (a record
# written, then passed with delay=0), not the cached "already passed" one.
# Fails unless Postfix delivers every message.
send() {
  local name=$1 port=$2 maillog=$3 pid=${4:-}
  local before
  before=$(delivered "$maillog")
  smtp_load "warm-$name-r$round" "$port" 200
  local t0 t1 m0 m1 g0=0 g1=0 u0=0 u1=0 v0=0 v1=0 i0=0 i1=0
  [ -n "$pid" ] && read -r g0 u0 < <(cpu_of "$pid") && read -r v0 i0 < <(switches_of "$pid")
  m0=$(machine)
  t0=$(date +%s.%N)
  smtp_load "$name-r$round" "$port" "$MSGS"
  t1=$(date +%s.%N)
  m1=$(machine)
  [ -n "$pid" ] && read -r g1 u1 < <(cpu_of "$pid") && read -r v1 i1 < <(switches_of "$pid")
  wait_delivered "$maillog" $((before + 200 + MSGS)) "$name"
  awk -v n="$MSGS" -v t="$(echo "$t1 - $t0" | bc)" -v g=$((g1 - g0)) -v u=$((u1 - u0)) -v m=$((m1 - m0)) -v hz="$hz" -v name="$name" \
    -v vs=$((v1 - v0)) -v is=$((i1 - i0)) -v pid="$pid" \
    'BEGIN { cs = pid == "" || pid ~ /^pf:/ ? "-" : sprintf("%.1f/%.1f", vs / n, is / n)
      printf "%s %.0f %.1f %.1f %.1f %s\n", name, n / t, g * 1e6 / hz / n, m * 1e6 / hz / n, u * 1e6 / hz / n, cs }'
}

source bench/dns.sh

pf_port=$(free_port)
postfix_start "$work/pf" "$pf_port" ""

gh_port=$(free_port)
# HOP=unix: greyhook relays to the same Postfix's smtpd on its unix socket.
if [ "${HOP:-inet}" = unix ]; then HOP_ADDR=unix:$work/pf/queue/public/greyhook-in; else HOP_ADDR=127.0.0.1:$pf_port; fi
${GH_WRAP:-} "$GH_BIN" smtp --listen "127.0.0.1:$gh_port" --next-hop "$HOP_ADDR" --db "$work/smtp.db" \
  --control "$work/smtp.sock" --dns "127.0.0.1:$dns_port" --set delay=0 --set auto_whitelist_after=0 ${GH_SET:+--set "$GH_SET"} --log warn >"$work/smtp.log" 2>&1 &
pids+=($!)
smtp_pid=$!
wait_port "$gh_port"

m_port=$(free_port)
# MILTER=unix: Postfix talks to the milter over a unix socket instead of TCP.
if [ "${MILTER:-inet}" = unix ]; then MILTER_ADDR=unix:$work/milter-in.sock; else MILTER_ADDR=inet:127.0.0.1:$m_port; fi
# Postfix's smtpd runs as `postfix`: it must be let in.
printf '[milter]\nsocket_mode = "0666"\n' >"$work/milter.toml"
pf2_port=$(free_port)
${GH_MILTER_WRAP:-} "$GH_BIN" serve --config "$work/milter.toml" --milter "${MILTER_ADDR#inet:}" --policy "127.0.0.1:$(free_port)" --db "$work/milter.db" \
  --control "$work/milter.sock" --dns "127.0.0.1:$dns_port" --set delay=0 --set auto_whitelist_after=0 ${GH_SET:+--set "$GH_SET"} --log warn >"$work/milter.log" 2>&1 &
pids+=($!)
milter_pid=$!
wait_milter "$MILTER_ADDR"
postfix_start "$work/pf2" "$pf2_port" "smtpd_milters = $MILTER_ADDR
milter_default_action = tempfail"

# The null milter, on the same kind of socket.
n_port=$(free_port)
if [ "${MILTER:-inet}" = unix ]; then NULL_ADDR=unix:$work/null-milter.sock; else NULL_ADDR=inet:127.0.0.1:$n_port; fi
nm_conn=$NULL_ADDR
[ "${NULL_ADDR#inet:}" = "$NULL_ADDR" ] || nm_conn=inet:$n_port@127.0.0.1
null_mode=${NULL_NR:+nr}
[ -z "${NULL_MIN:-}" ] || null_mode=min
"$work/nullmilter" "$nm_conn" $null_mode >"$work/nullmilter.log" 2>&1 &
pids+=($!)
null_pid=$!
wait_milter "$NULL_ADDR"
# Postfix's smtpd runs as `postfix`: it must be let in.
[ "${NULL_ADDR#unix:}" = "$NULL_ADDR" ] || chmod 666 "${NULL_ADDR#unix:}"
pf3_port=$(free_port)
postfix_start "$work/pf3" "$pf3_port" "smtpd_milters = $NULL_ADDR
milter_default_action = tempfail"

# The peer of `greyhook smtp`: Postfix's before-queue proxy, relaying to
# the same next hop as greyhook does (its smtpd passes each command on as
# the client sends it, XFORWARD first, and the client's 250 after the dot is
# the next hop's).
pf4_port=$(free_port)
postfix_start "$work/pf4" "$pf4_port" "smtpd_proxy_filter = $HOP_ADDR"
pf4_master=$(tr -d ' ' <"$work/pf4/queue/pid/master.pid")

# The floor: the null relay, relaying to the same Postfix over TCP (also
# with HOP=unix: it speaks TCP only).
nr_port=$(free_port)
${NR_WRAP:-} "$work/nullrelay" "$nr_port" "$pf_port" >"$work/nullrelay.log" 2>&1 &
pids+=($!)
nr_pid=$!
wait_port "$nr_port"

# ROUNDS rounds of the six paths back to back: this shared machine's
# speed drifts over minutes, so each round's ratios compare paths measured
# within seconds of each other, and the summary is the median round.
rounds=()
for round in $(seq 1 "$ROUNDS"); do
  straight=$(send straight "$pf_port" "$work/pf/maillog")
  via=$(send via-greyhook-smtp "$gh_port" "$work/pf/maillog" "$smtp_pid")
  proxy=$(send via-postfix-proxy "$pf4_port" "$work/pf/maillog" "pf:$pf4_master")
  floor=$(send via-null-relay "$nr_port" "$work/pf/maillog" "$nr_pid")
  milter=$(send postfix-with-milter "$pf2_port" "$work/pf2/maillog" "$milter_pid")
  null=$(send postfix-with-null-milter "$pf3_port" "$work/pf3/maillog" "$null_pid")
  echo
  echo "round $round of $ROUNDS"
  echo "(for via-postfix-proxy, the CPU columns are the proxying Postfix's, all its processes;"
  echo " for via-null-relay, the null relay's; for postfix-with-null-milter, the null milter's)"
  printf "%-24s %10s %18s %22s %20s %26s\n" "path" "msgs/s" "greyhook µs/msg" "of it user µs/msg" "machine CPU µs/msg" "greyhook switches/msg v/i"
  for r in "$straight" "$via" "$proxy" "$floor" "$milter" "$null"; do
    read -r n rate g m u cs <<<"$r"
    printf "%-24s %10s %18s %22s %20s %26s\n" "$n" "$rate" "$g" "$u" "$m" "$cs"
  done
  read -r _ s_rate _ s_m _ <<<"$straight"
  read -r _ v_rate v_g v_m v_u _ <<<"$via"
  read -r _ m_rate m_g m_m m_u _ <<<"$milter"
  read -r _ n_rate n_g _ _ _ <<<"$null"
  read -r _ p_rate p_g _ p_u _ <<<"$proxy"
  read -r _ f_rate f_g _ f_u _ <<<"$floor"
  # One line a round: the ratios and greyhook's CPU a message.
  rounds+=("$(awk -v a="$s_rate" -v b="$v_rate" -v c="$m_rate" -v sm="$s_m" -v vm="$v_m" -v mm="$m_m" -v vg="$v_g" -v mg="$m_g" -v d="$n_rate" -v ng="$n_g" \
    -v e="$p_rate" -v pg="$p_g" -v pu="$p_u" -v vu="$v_u" -v f="$f_rate" -v fg="$f_g" -v fu="$f_u" \
    'BEGIN { printf "%.3f %.3f %.3f %.3f %.3f %.1f %.1f %.3f %.3f %.1f %.3f %.1f %.3f %.1f %.1f %.3f %.1f %.1f %.3f %.1f", b / a, c / a, vm / sm, mm / sm, sm / (mm - mg), vg, mg, d / a, c / d, ng, e / a, pg, vg / pg, pu, vu, f / a, fg, fu, vg / fg, vg - fg }')")
  read -r tv tm cv cm ceil _ _ tn mn _ tp _ gp _ _ tf _ _ gf gd <<<"${rounds[-1]}"
  printf "throughput via greyhook smtp / straight: %s; with milter / straight: %s\n" "$tv" "$tm"
  printf "throughput with the null milter / straight: %s; with greyhook's milter / with the null milter: %s\n" "$tn" "$mn"
  printf "throughput via Postfix's proxy / straight: %s; CPU a message, greyhook smtp / Postfix's proxy: %s\n" "$tp" "$gp"
  printf "throughput via the null relay / straight: %s; CPU a message, greyhook smtp / the null relay: %s (%s µs above it)\n" "$tf" "$gf" "$gd"
  printf "machine CPU per message, via greyhook smtp / straight: %s; with milter / straight: %s\n" "$cv" "$cm"
  # What the milter path would reach if greyhook cost nothing, on a
  # CPU-bound machine: the rest is Postfix's own milter work.
  printf "milter ceiling, greyhook at 0 CPU (straight machine CPU / the rest): %s\n" "$ceil"
done

# Every message through greyhook took the filter's first-sight path (a new
# triplet, its record written and passed), none a shortcut such as the
# auto-whitelist: the filter's own counts say so.
for d in smtp milter; do
  status=$("$GH_BIN" status --control "$work/$d.sock")
  n=$(grep -o 'triplets_total{identity="[a-z-]*",outcome="passed"} [0-9]*' <<<"$status" | awk '{n += $2} END {print n + 0}')
  [ "$n" -ge $((ROUNDS * (200 + MSGS))) ] || fail "$d: $n first sights (triplets passed) for $((ROUNDS * (200 + MSGS))) messages"
  ! grep -q 'skipped_total' <<<"$status" || fail "$d: the filter skipped messages: $(grep -o 'skipped_total[^,]*' <<<"$status")"
done

# The median of each column over the rounds.
median() { printf '%s\n' "${rounds[@]}" | awk -v c="$1" '{print $c}' | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
echo
echo "median of $ROUNDS rounds:"
printf "throughput via greyhook smtp / straight: %.2f\n" "$(median 1)"
printf "throughput with milter / straight:       %.2f\n" "$(median 2)"
printf "machine CPU per message, via greyhook smtp / straight: %.2f\n" "$(median 3)"
printf "machine CPU per message, with milter / straight:       %.2f\n" "$(median 4)"
printf "milter ceiling, greyhook at 0 CPU:       %.2f\n" "$(median 5)"
printf "throughput with the null milter / straight: %.2f\n" "$(median 8)"
printf "throughput with greyhook's milter / with the null milter: %.2f\n" "$(median 9)"
printf "throughput via Postfix's before-queue proxy / straight: %.2f\n" "$(median 11)"
printf "greyhook CPU µs a message: smtp %.1f (user %.1f), milter %.1f; the null milter's: %.1f\n" "$(median 6)" "$(median 15)" "$(median 7)" "$(median 10)"
printf "Postfix's before-queue proxy, the whole instance's CPU µs a message: %.1f (user %.1f)\n" "$(median 12)" "$(median 14)"
printf "CPU a message, greyhook smtp / Postfix's before-queue proxy: %.2f\n" "$(median 13)"
printf "throughput via the null relay / straight: %.2f\n" "$(median 16)"
printf "the null relay's CPU µs a message (the floor): %.1f (user %.1f)\n" "$(median 17)" "$(median 18)"
printf "CPU a message, greyhook smtp / the null relay: %.2f; greyhook smtp above the floor: %.1f µs\n" "$(median 19)" "$(median 20)"
