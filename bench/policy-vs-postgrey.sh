#!/usr/bin/env bash
# greyhook serve against postgrey on the same load, measured in one run:
# requests/s, p50/p99 latency, and server CPU µs per request, with ratios.
# Both get a fresh private database, the same triplets and the same 29
# attributes per request (tools/policy-load). Both must keep the greylisting
# invariant (all deferred: the delay is longer than the run). And the
# floor: bench/nullpolicy.c, a C server that reads each request to its
# empty line and answers it with a deferral, one epoll loop doing nothing
# else: what any policy server of this load costs on this machine, of
# which the kernel's share (system calls, wake-ups, TCP) is most.
#
#   bench/policy-vs-postgrey.sh            # 16 connections x 2000 requests
#   CONNS=4 REQS=500 bench/policy-vs-postgrey.sh
#   GH_LOG=warn bench/policy-vs-postgrey.sh  # greyhook without its decision log
#   GH_SET='identity=["network"]' bench/policy-vs-postgrey.sh  # the filter without SPF lookups
#   GH_BIN=target/release-lto/greyhook bench/policy-vs-postgrey.sh  # another build of greyhook
set -euo pipefail
# A failed step inside $(...) must stop the script too: no figures from a
# failed run.
shopt -s inherit_errexit
fail() { echo "FAILED: $*" >&2; exit 1; }
cd "$(dirname "$0")/.."
CONNS=${CONNS:-16}
REQS=${REQS:-2000}
TRIPLETS=${TRIPLETS:-10000}

if ! command -v postgrey >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq postgrey >/dev/null
fi
# GH_BIN: another greyhook binary to measure (default: this tree's release
# build, built first).
if [ -z "${GH_BIN:-}" ]; then
  cargo build --release -q -p greyhook
  GH_BIN=target/release/greyhook
fi
cargo build --release -q -p policy-load
load=target/release/policy-load
work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
source bench/dns.sh

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "nothing on port $1" >&2; exit 1; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

# run NAME PORT PID: prints "NAME rps p50 p99 cpu_us"
run() {
  local name=$1 port=$2 pid=$3
  "$load" --target "127.0.0.1:$port" --connections 4 --requests 200 --triplets 800 --salt "warm-$name" >/dev/null ||
    fail "$name: warm-up"
  local t0 t1 out
  t0=$(ticks "$pid")
  out=$("$load" --target "127.0.0.1:$port" --connections "$CONNS" --requests "$REQS" --triplets "$TRIPLETS" --salt "main-$name" --expect-defer) ||
    fail "$name: policy-load --expect-defer: not every answer was a deferral: $out"
  t1=$(ticks "$pid")
  [ "$t1" -gt "$t0" ] || fail "$name: no CPU time counted for pid $pid"
  echo "$name: $out" >&2
  local n rps p50 p99
  n=$(sed -E 's/.*requests=([0-9]+).*/\1/' <<<"$out")
  rps=$(sed -E 's/.*rps=([0-9]+).*/\1/' <<<"$out")
  p50=$(sed -E 's/.*p50_us=([0-9]+).*/\1/' <<<"$out")
  p99=$(sed -E 's/.*p99_us=([0-9]+).*/\1/' <<<"$out")
  echo "$name $rps $p50 $p99 $(awk -v d=$((t1 - t0)) -v hz="$hz" -v n="$n" 'BEGIN{printf "%.1f", d * 1e6 / hz / n}')"
}

pg_port=$(free_port)
mkdir -p "$work/pg" && chown postgrey "$work/pg" 2>/dev/null || true
postgrey --inet="127.0.0.1:$pg_port" --dbdir="$work/pg" --delay=300 >"$work/postgrey.log" 2>&1 &
pids+=($!)
wait_port "$pg_port"
# (pids[0] is bench/dns.sh's dnsmasq.)
pg=$(run postgrey "$pg_port" "${pids[-1]}")
kill "${pids[-1]}"

gh_port=$(free_port)
GREYHOOK_LOG=${GH_LOG:-info} "$GH_BIN" serve --policy "127.0.0.1:$gh_port" --db "$work/greyhook.db" --control "$work/control.sock" --dns "127.0.0.1:$dns_port" ${GH_SET:+--set "$GH_SET"} >"$work/greyhook.log" 2>&1 &
pids+=($!)
wait_port "$gh_port"
gh=$(run greyhook "$gh_port" "${pids[-1]}")

cc -O2 -o "$work/nullpolicy" bench/nullpolicy.c
np_port=$(free_port)
"$work/nullpolicy" "$np_port" >"$work/nullpolicy.log" 2>&1 &
pids+=($!)
wait_port "$np_port"
floor=$(run floor "$np_port" "${pids[-1]}")

echo
echo "policy load: $CONNS connections x $REQS requests, $TRIPLETS triplets, Postfix 3.7.11 RCPT attributes; $(nproc) cores; greyhook log level ${GH_LOG:-info}"
printf '%-10s %12s %10s %10s %14s\n' server "requests/s" "p50 µs" "p99 µs" "CPU µs/req"
for row in "$pg" "$gh" "$floor"; do
  read -r name rps p50 p99 cpu <<<"$row"
  printf '%-10s %12s %10s %10s %14s\n' "$name" "$rps" "$p50" "$p99" "$cpu"
done
read -r _ prps pp50 pp99 pcpu <<<"$pg"
read -r _ grps gp50 gp99 gcpu <<<"$gh"
read -r _ _ _ _ fcpu <<<"$floor"
awk -v a="$grps" -v b="$prps" -v c="$pcpu" -v d="$gcpu" -v e="$pp99" -v f="$gp99" \
  'BEGIN{printf "greyhook/postgrey: %.1fx requests/s, %.1fx less CPU per request, %.1fx lower p99\n", a/b, c/d, e/f}'
awk -v g="$gcpu" -v f="$fcpu" \
  'BEGIN{printf "greyhook/floor (bench/nullpolicy.c): %.2fx the CPU per request, %.1f µs above it\n", g/f, g-f}'
