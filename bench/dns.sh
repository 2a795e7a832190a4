# Sourced by the bench scripts, after `work` and `pids` are set: starts a
# private DNS server (dnsmasq) that answers every name at once (NXDOMAIN)
# and sets `dns_port`. greyhook looks up client names and the reference
# filter asks for SPF records; on a machine whose resolver does not answer,
# every lookup would be cut at the hook's deadline and the figures would
# measure the resolver, not greyhook.
[ -x /usr/sbin/dnsmasq ] || { echo "dnsmasq missing: apt-get install dnsmasq-base" >&2; exit 1; }
dns_port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
/usr/sbin/dnsmasq --keep-in-foreground --no-resolv --no-hosts --listen-address=127.0.0.1 --bind-interfaces \
  --port="$dns_port" --local=/#/ --user="$(id -un)" --pid-file="$work/dnsmasq.pid" &
pids+=($!)
sleep 0.5
