#!/usr/bin/env bash
# Makes a private OpenSMTPD for tests/all/opensmtpd.rs: Debian's package
# conflicts with Postfix as the installed MTA, so it is downloaded and
# unpacked (not installed) into DEST (default /opt/greyhook-ci/opensmtpd),
# its libraries are installed, and what the binary expects is created: the
# users opensmtpd and opensmtpq, /var/lib/opensmtpd/empty, and the spool
# /var/spool/smtpd (mode 0711). Idempotent; run as root (.ci/run does).
set -euo pipefail
dest=${1:-/opt/greyhook-ci/opensmtpd}
if [ ! -x "$dest/usr/sbin/smtpd" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq libdb5.3 libevent-2.1-7 libssl3 libpam0g zlib1g libcrypt1 >/dev/null
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download opensmtpd >/dev/null)
  mkdir -p "$dest"
  dpkg -x "$tmp"/opensmtpd_*.deb "$dest"
  rm -rf "$tmp"
fi
mkdir -p /var/lib/opensmtpd/empty
for u in opensmtpd opensmtpq; do
  getent group "$u" >/dev/null || groupadd --system "$u"
  getent passwd "$u" >/dev/null || useradd --system --gid "$u" --home-dir /var/lib/opensmtpd/empty --shell /usr/sbin/nologin "$u"
done
mkdir -p /var/spool/smtpd
chmod 0711 /var/spool/smtpd
"$dest/usr/sbin/smtpd" -h 2>&1 | head -1 || true
echo "OpenSMTPD ready: $dest/usr/sbin/smtpd"
