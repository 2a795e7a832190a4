#!/usr/bin/env bash
# Builds the Debian package from a built greyhook binary:
#   contrib/debian/build-deb.sh target/release-lto/greyhook [OUTDIR]
# (cargo build --profile release-lto -p greyhook first: the release build
# with whole-program optimisation, see Cargo.toml; any build of the binary
# works, CI packages its debug one). It stages the binary
# (stripped), the systemd unit, the commented default configuration
# (a conffile), the docs and the maintainer scripts (the `greyhook` system
# user owning /var/lib/greyhook), and runs dpkg-deb — Debian's own tool
# for this; no cargo plugin to compile. Prints the .deb's path.
set -euo pipefail
bin=${1:?usage: build-deb.sh BINARY [OUTDIR]}
out=${2:-.}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
install -d "$stage/DEBIAN" "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/etc/greyhook" "$stage/usr/share/doc/greyhook"
install -m 0755 "$bin" "$stage/usr/bin/greyhook"
strip --strip-debug "$stage/usr/bin/greyhook"
install -m 0644 "$here/greyhook.service" "$stage/lib/systemd/system/greyhook.service"
install -m 0644 "$here/greyhook.toml" "$stage/etc/greyhook/greyhook.toml"
for d in README.md docs/configuration.md docs/operating.md docs/postfix.md; do
  install -m 0644 "$root/$d" "$stage/usr/share/doc/greyhook/$(basename "$d")"
done
cat "$root/LICENSE-MIT" "$root/LICENSE-APACHE" > "$stage/usr/share/doc/greyhook/copyright"
install -m 0755 "$here/postinst" "$here/prerm" "$here/postrm" "$stage/DEBIAN/"
echo /etc/greyhook/greyhook.toml > "$stage/DEBIAN/conffiles"
cat > "$stage/DEBIAN/control" <<CONTROL
Package: greyhook
Version: $version
Architecture: $arch
Maintainer: greyhook developers <greyhook@localhost>
Depends: adduser, libc6
Section: mail
Priority: optional
Installed-Size: $(du -sk "$stage" | cut -f1)
Homepage: https://github.com/greyhook/greyhook
Description: greylisting for MTAs, with filters as WebAssembly components
 greyhook tempfails the first delivery attempt from an unknown (client,
 sender, recipient) triplet and accepts the retry after a delay. It answers
 Postfix's policy delegation (127.0.0.1:10023 by default), milter, and a
 before-queue SMTP front end; its policy is a WebAssembly component that
 can be hot-swapped.
CONTROL
deb="$out/greyhook_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zgzip -z3 --build "$stage" "$deb" >/dev/null
echo "$deb"
