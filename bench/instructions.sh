#!/usr/bin/env bash
# Instructions greyhook's runtime workers spend a request, counted by
# callgrind (stable where CPU time on a shared machine is not).
#
#   bench/instructions.sh policy        # a policy request (greyhook serve + tools/policy-load)
#   GH_BIN=target/release-lto/greyhook bench/instructions.sh policy   # the same, another build
#   bench/instructions.sh sum OUT       # the runtime workers' total in OUT-* (callgrind
#                                       # --separate-threads=yes output), e.g. after
#   GH_WRAP='valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file=/tmp/cg.smtp' \
#     MSGS=300 GH_SET='identity=["network"]' bench/smtp-vs-postfix.sh
#
# `policy` runs greyhook serve under callgrind twice, with 1 000 and then
# 5 000 requests (4 connections, 2 000 triplets, the network identity so
# no DNS, decision log on), and prints the difference of the workers'
# totals divided by 4 000: start-up and warm-up cancel out.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind missing: apt-get install valgrind" >&2; exit 1; }

# Sum of the instructions of the threads that ran tokio's workers.
sum() {
  local total=0 f n
  for f in "$1"-*; do
    grep -q "multi_thread::worker::run" "$f" || continue
    n=$(awk '/^summary:/ {print $2; exit}' "$f")
    total=$((total + n))
  done
  [ "$total" -gt 0 ] || { echo "no runtime worker threads in $1-*" >&2; exit 1; }
  echo "$total"
}

policy_run() {
  local n=$1 out=$2 work port pid
  work=$(mktemp -d)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  rm -f "$out"-*
  GREYHOOK_LOG=info valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$out" \
    "$GH_BIN" serve --policy "127.0.0.1:$port" --db "$work/g.db" --control "$work/c.sock" \
    --dns 127.0.0.1:9 --set 'identity=["network"]' >"$work/log" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.5; done
  target/release/policy-load --target "127.0.0.1:$port" --connections 4 --requests $((n / 4)) --triplets 2000 \
    --salt "run$n" --expect-defer >/dev/null || { cat "$work/log" >&2; kill "$pid"; exit 1; }
  kill -TERM "$pid"
  wait "$pid" || true
  rm -rf "$work"
}

case "${1:-}" in
  sum) sum "$2" ;;
  policy)
    # GH_BIN: another build of greyhook to count (e.g.
    # target/release-lto/greyhook); by default this tree's, built first.
    if [ -z "${GH_BIN:-}" ]; then
      cargo build --release -q -p greyhook
      GH_BIN=target/release/greyhook
    fi
    cargo build --release -q -p policy-load
    dir=$(mktemp -d)
    policy_run 1000 "$dir/cg.1000"
    policy_run 5000 "$dir/cg.5000"
    a=$(sum "$dir/cg.1000")
    b=$(sum "$dir/cg.5000")
    echo "policy request: $(((b - a) / 4000)) instructions (runtime workers; 5000 - 1000 requests)"
    rm -rf "$dir"
    ;;
  *) sed -n '2,15p' "$0" >&2; exit 2 ;;
esac
