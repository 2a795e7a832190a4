#!/usr/bin/env bash
# The Debian package as an operator meets it (run by .ci/run as root, after
# the tests built target/debug/greyhook): build it, `apt-get install` it,
# check the greyhook user, its directories and the conffile, start the
# service as its unit says (systemd when it runs, else the unit's ExecStart
# as its User= with the directories systemd would give), ask it a Postfix
# policy request on the embedded default 127.0.0.1:10023, ask `greyhook
# status`, then purge it and check nothing is left.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/greyhook}
out=$(mktemp -d)
fail() { echo "deb test: $*" >&2; exit 1; }
pid=
saved=()
# A failed check leaves neither the daemon it started nor the package
# behind (a second run, or the next job on the machine, would meet them),
# and what was set aside before the install is put back.
cleanup() {
  local rc=$?
  if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  if [ "$rc" -ne 0 ] && dpkg -s greyhook >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq greyhook >/dev/null 2>&1 || true
  fi
  for d in "${saved[@]}"; do
    rm -rf "$d" && mv "$out/saved$d" "$d"
  done
  rm -rf "$out"
}
trap cleanup EXIT

# This test installs and purges its own package: never an operator's.
! dpkg -s greyhook >/dev/null 2>&1 || fail "the greyhook package is installed here; this test would purge it"
# The checks below are of what the package creates. greyhook run as root
# on its embedded defaults (the README's first command) keeps its store
# in /var/lib/greyhook and its compiled filters in /var/cache/greyhook:
# set aside for the test, put back after.
for d in /var/lib/greyhook /var/cache/greyhook; do
  if [ -e "$d" ]; then
    mkdir -p "$out/saved$(dirname "$d")" && mv "$d" "$out/saved$d" && saved+=("$d")
  fi
done

deb=$(contrib/debian/build-deb.sh "$bin" "$out")
info=$(dpkg-deb --info "$deb") && contents=$(dpkg-deb --contents "$deb") || fail "dpkg-deb cannot read $deb"
grep -q "Package: greyhook" <<<"$info" || fail "no control file"
grep -q "./lib/systemd/system/greyhook.service" <<<"$contents" || fail "no unit in the package"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$(realpath "$deb")" >/dev/null

[ -x /usr/bin/greyhook ] || fail "/usr/bin/greyhook missing"
getent passwd greyhook >/dev/null || fail "no greyhook user"
[ "$(stat -c %U /var/lib/greyhook)" = greyhook ] || fail "/var/lib/greyhook is not owned by greyhook"
grep -q "^/etc/greyhook/greyhook.toml$" /var/lib/dpkg/info/greyhook.conffiles || fail "the configuration is not a conffile"

if [ -d /run/systemd/system ]; then
  systemctl is-active --quiet greyhook || fail "the service did not start"
  pid=
else
  # No systemd (a container): what the unit would run, as the unit would.
  exec_start=$(sed -n 's/^ExecStart=//p' /lib/systemd/system/greyhook.service)
  install -d -o greyhook -g greyhook /run/greyhook
  setpriv --reuid=greyhook --regid=greyhook --init-groups -- env STATE_DIRECTORY=/var/lib/greyhook RUNTIME_DIRECTORY=/run/greyhook \
    CACHE_DIRECTORY=/var/cache/greyhook $exec_start 2>"$out/greyhook.log" &
  pid=$!
fi

reply=$(/usr/bin/python3 - <<'PY'
import socket, time
req = b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.1\nclient_name=unknown\nsender=a@example.org\nrecipient=b@example.com\n\n"
for _ in range(300):
    try:
        s = socket.create_connection(("127.0.0.1", 10023), timeout=10)
        break
    except OSError:
        time.sleep(0.1)
else:
    raise SystemExit("nothing listens on 127.0.0.1:10023")
s.sendall(req)
data = b""
while not data.endswith(b"\n\n"):
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print(data.decode().strip())
PY
) || { cat "$out/greyhook.log" >&2 || true; fail "no answer on 127.0.0.1:10023"; }
case "$reply" in
  "action=451 4.7.1 "*"retry=00:05:00") ;;
  *) cat "$out/greyhook.log" >&2 || true; fail "unexpected answer: $reply" ;;
esac
status=$(greyhook status) || fail "greyhook status failed"
echo "$status" | grep -q "store redb: redb file /var/lib/greyhook/greyhook.db" || fail "status: $status"
echo "$status" | grep -q "^filter greylist " || fail "status: $status"
[ -f /var/lib/greyhook/greyhook.db ] && [ "$(stat -c %U /var/lib/greyhook/greyhook.db)" = greyhook ] || fail "the store is not greyhook's"
# Compiled filters go to the unit's CacheDirectory=, not into the state.
ls /var/cache/greyhook/filters/*.cwasm >/dev/null 2>&1 || fail "no compiled filter in /var/cache/greyhook/filters"
[ ! -e /var/lib/greyhook/cache ] || fail "compiled filters cached in /var/lib/greyhook/cache, beside the store"

if [ -n "$pid" ]; then
  kill -TERM "$pid"
  wait "$pid" || { pid=; fail "greyhook did not stop cleanly"; }
  pid=
fi
DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq greyhook >/dev/null
[ ! -e /usr/bin/greyhook ] || fail "/usr/bin/greyhook left behind"
[ ! -e /lib/systemd/system/greyhook.service ] || fail "the unit left behind"
[ ! -e /var/lib/greyhook ] || fail "/var/lib/greyhook left behind after purge"
[ ! -e /var/cache/greyhook ] || fail "/var/cache/greyhook left behind after purge"
[ ! -e /etc/greyhook/greyhook.toml ] || fail "the conffile left behind after purge"
! getent passwd greyhook >/dev/null || fail "the greyhook user left behind after purge"
echo "deb test: installed, answered \"$reply\", purged cleanly"
