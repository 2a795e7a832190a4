# Sourced by the bench scripts, after `postfixes` (an array the caller
# stops every instance of at exit), `SESSIONS`, `wait_port PORT` and
# `fail MESSAGE` are set: a private Postfix instance for the benches,
# delivering to `discard` so that the MTA's own cost stays small, logging
# to DIR/maillog (where the scripts count deliveries), and the load
# `smtp-source` sends it.
#
# postfix_start DIR PORT EXTRA_MAIN_CF: starts the instance in DIR with its
# smtpd on 127.0.0.1:PORT (and on DIR/queue/public/greyhook-in, a unix
# socket), EXTRA_MAIN_CF added to its main.cf, and waits for it to listen.
postfix_start() {
  local d=$1 port=$2 extra=$3
  mkdir -p "$d/etc" "$d/queue" "$d/data"
  chown postfix "$d/data"
  cat >"$d/etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $d/queue
data_directory = $d/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mx.bench.test
mydestination = bench.test
mynetworks = 127.0.0.0/8
local_recipient_maps =
alias_maps =
alias_database =
local_transport = discard
default_transport = discard
smtputf8_enable = no
maillog_file = $d/maillog
maillog_file_prefixes = $d
smtpd_authorized_xforward_hosts = 127.0.0.0/8
default_process_limit = 100
$extra
EOF
  cat >"$d/etc/master.cf" <<EOF
127.0.0.1:$port inet n - n - - smtpd
greyhook-in unix n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
  postfix -c "$d/etc" start >/dev/null 2>&1
  postfixes+=("$d")
  wait_port "$port"
}

# free_port: a TCP port on 127.0.0.1 nothing listens on now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# machine: the whole machine's CPU clock ticks so far (user, nice, system,
# irq, softirq), from /proc/stat.
machine() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }

# Messages Postfix has delivered (to `discard`) according to MAILLOG.
delivered() { local n; n=$(grep -c "status=sent" "$1" 2>/dev/null) || true; echo "${n:-0}"; }

# smtp_load TAG PORT N: N messages from Postfix's smtp-source, SESSIONS at
# once, one a session, each to its own recipient (`smtp-source -N` numbers
# them: 1TAG@bench.test, 2TAG@bench.test...), so that each is a new triplet
# when TAG is new.
smtp_load() {
  /usr/sbin/smtp-source -N -s "$SESSIONS" -m "$3" -f bench@sender.test -t "$1@bench.test" "127.0.0.1:$2" ||
    fail "$1: smtp-source"
}

# wait_delivered MAILLOG WANT NAME: waits (up to 60 s) until MAILLOG counts
# WANT deliveries, else fails: no figures from a run that lost a message.
wait_delivered() {
  local got
  for _ in $(seq 1 600); do
    got=$(delivered "$1")
    [ "$got" -ge "$2" ] && return 0
    sleep 0.1
  done
  fail "$3: Postfix delivered $got of the $2 messages its log should count"
}
