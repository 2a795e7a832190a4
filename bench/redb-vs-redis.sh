#!/usr/bin/env bash
# `greyhook serve` on its embedded redb store against the same daemon on a
# private redis-server, same load, one run: requests/s, p50/p99, and server
# CPU µs per request (greyhook, and greyhook + redis-server), with ratios;
# then the same Redis over TLS (`rediss://`, client certificates: what a
# farm across a network should run), against plain Redis.
# The delay is longer than the run, so every answer must be a deferral.
#
#   bench/redb-vs-redis.sh                # 16 connections x 2000 requests
#   CONNS=4 REQS=500 bench/redb-vs-redis.sh
set -euo pipefail
# A failed step inside $(...) must stop the script too: no figures from a
# failed run.
shopt -s inherit_errexit
fail() { echo "FAILED: $*" >&2; exit 1; }
cd "$(dirname "$0")/.."
CONNS=${CONNS:-16}
REQS=${REQS:-2000}
TRIPLETS=${TRIPLETS:-10000}

command -v redis-server >/dev/null 2>&1 || { echo "redis-server missing: apt-get install redis-server" >&2; exit 1; }
cargo build --release -q -p greyhook -p policy-load
load=target/release/policy-load
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
source bench/dns.sh

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "nothing on port $1" >&2; exit 1; }
ticks() { local t=0; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }
hz=$(getconf CLK_TCK)

# run NAME PORT GREYHOOK_PID [OTHER_PID]: "NAME rps p50 p99 greyhook_cpu_us server_cpu_us"
run() {
  local name=$1 port=$2 pid=$3 other=${4:-}
  "$load" --target "127.0.0.1:$port" --connections 4 --requests 200 --triplets 800 --salt "warm-$name" >/dev/null ||
    fail "$name: warm-up"
  local g0 g1 s0 s1 out
  g0=$(ticks "$pid"); s0=$(ticks "$pid" $other)
  out=$("$load" --target "127.0.0.1:$port" --connections "$CONNS" --requests "$REQS" --triplets "$TRIPLETS" --salt "main-$name" --expect-defer) ||
    fail "$name: policy-load --expect-defer: not every answer was a deferral: $out"
  g1=$(ticks "$pid"); s1=$(ticks "$pid" $other)
  echo "$name: $out" >&2
  local n rps p50 p99
  n=$(sed -E 's/.*requests=([0-9]+).*/\1/' <<<"$out")
  rps=$(sed -E 's/.*rps=([0-9]+).*/\1/' <<<"$out")
  p50=$(sed -E 's/.*p50_us=([0-9]+).*/\1/' <<<"$out")
  p99=$(sed -E 's/.*p99_us=([0-9]+).*/\1/' <<<"$out")
  awk -v name="$name" -v rps="$rps" -v p50="$p50" -v p99="$p99" -v g=$((g1 - g0)) -v s=$((s1 - s0)) -v hz="$hz" -v n="$n" \
    'BEGIN { printf "%s %s %s %s %.1f %.1f\n", name, rps, p50, p99, g * 1e6 / hz / n, s * 1e6 / hz / n }'
}

p1=$(free_port)
target/release/greyhook serve --policy "127.0.0.1:$p1" --db "$work/greyhook.db" --control "$work/a.sock" --dns "127.0.0.1:$dns_port" --log warn >"$work/a.log" 2>&1 &
pids+=($!)
wait_port "$p1"
redb=$(run redb "$p1" "${pids[-1]}")
kill "${pids[-1]}"

rport=$(free_port)
mkdir -p "$work/redis"
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$work/redis" >/dev/null 2>&1 &
pids+=($!)
rpid=${pids[-1]}
wait_port "$rport"
p2=$(free_port)
target/release/greyhook serve --policy "127.0.0.1:$p2" --db "redis://127.0.0.1:$rport/0" --control "$work/b.sock" --dns "127.0.0.1:$dns_port" --log warn >"$work/b.log" 2>&1 &
pids+=($!)
wait_port "$p2"
red=$(run redis "$p2" "${pids[-1]}" "$rpid")
kill "${pids[-1]}" "$rpid"

# Redis over TLS: a private CA, the server's certificate for 127.0.0.1,
# a client certificate (Redis asks for one by default).
command -v openssl >/dev/null 2>&1 || fail "openssl missing (it makes the TLS run's certificates): apt-get install openssl"
t=$work/tls
mkdir -p "$t"
(
  cd "$t"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=bench-ca
  for who in server client; do
    openssl req -newkey rsa:2048 -nodes -keyout "$who.key" -out "$who.csr" -subj "/CN=$who"
    printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' >"$who.ext"
    openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$who.pem" -days 2 -extfile "$who.ext"
  done
) >/dev/null 2>&1 || fail "openssl: the TLS run's certificates"
tport=$(free_port)
mkdir -p "$work/redis-tls"
redis-server --port 0 --tls-port "$tport" --tls-cert-file "$t/server.pem" --tls-key-file "$t/server.key" --tls-ca-cert-file "$t/ca.pem" \
  --bind 127.0.0.1 --save "" --appendonly no --dir "$work/redis-tls" >/dev/null 2>&1 &
pids+=($!)
tpid=${pids[-1]}
wait_port "$tport"
printf '[store]\npath = "rediss://127.0.0.1:%s/0"\ntls_ca = "%s"\ntls_cert = "%s"\ntls_key = "%s"\n' \
  "$tport" "$t/ca.pem" "$t/client.pem" "$t/client.key" >"$work/tls.toml"
p3=$(free_port)
target/release/greyhook serve --config "$work/tls.toml" --policy "127.0.0.1:$p3" --control "$work/c.sock" --dns "127.0.0.1:$dns_port" --log warn >"$work/c.log" 2>&1 &
pids+=($!)
wait_port "$p3"
tls=$(run rediss "$p3" "${pids[-1]}" "$tpid")

echo
echo "policy load: $CONNS connections x $REQS requests, $TRIPLETS triplets; $(nproc) cores; decision logging off"
printf '%-8s %12s %8s %8s %16s %22s\n' store "requests/s" "p50 µs" "p99 µs" "greyhook µs/req" "greyhook+redis µs/req"
for row in "$redb" "$red" "$tls"; do
  read -r name rps p50 p99 g s <<<"$row"
  printf '%-8s %12s %8s %8s %16s %22s\n' "$name" "$rps" "$p50" "$p99" "$g" "$s"
done
read -r _ arps _ ap99 ag as <<<"$redb"
read -r _ brps _ bp99 bg bs <<<"$red"
awk -v a="$arps" -v b="$brps" -v ag="$ag" -v bs="$bs" -v bg="$bg" -v ap="$ap99" -v bp="$bp99" \
  'BEGIN { printf "redis/redb: %.2fx requests/s, %.2fx greyhook CPU per request, %.2fx server CPU (with redis-server), %.2fx p99\n", b/a, bg/ag, bs/ag, bp/ap }'
read -r _ crps _ cp99 cg cs <<<"$tls"
awk -v b="$brps" -v c="$crps" -v bg="$bg" -v cg="$cg" -v bs="$bs" -v cs="$cs" -v bp="$bp99" -v cp="$cp99" \
  'BEGIN { printf "rediss/redis (TLS): %.2fx requests/s, %.2fx greyhook CPU per request, %.2fx server CPU (with redis-server), %.2fx p99\n", c/b, cg/bg, cs/bs, cp/bp }'
