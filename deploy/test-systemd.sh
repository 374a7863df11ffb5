#!/usr/bin/env bash
# Checks the files a systemd install uses, without systemd running:
# 1. `systemd-analyze verify` of deploy/systemd/*.service in a temporary
#    root holding the static binary at /usr/local/bin/ferry (the host is
#    not touched); any message at all is a failure (verify exits 0 on an
#    unknown key).
# 2. deploy/scheduler.toml and deploy/worker.toml, as the units load them:
#    a one-node cluster from the scheduler example (flags override only
#    its addresses and data directory), and a worker from the worker
#    example (its paths moved under a temporary directory, its addresses
#    overridden) that must register with its name and labels and write
#    the config file of its first [[config_files]] rule. Both must stop
#    cleanly (exit 0) on SIGTERM.
#
#   deploy/test-systemd.sh      # builds the static binary if needed
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "test-systemd: FAIL: $*" >&2; exit 1; }
step() { echo "== test-systemd: $*"; }

command -v systemd-analyze >/dev/null || fail "systemd-analyze not found (apt-get install systemd)"
bin=$(deploy/build-static.sh)

tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

step "systemd-analyze verify deploy/systemd/*.service"
root=$tmp/root
mkdir -p "$root/usr/local/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd"
cp "$bin" "$root/usr/local/bin/ferry"
# The host's own units (multi-user.target, sysinit.target, ...), which ours name.
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
for unit in deploy/systemd/*.service; do
    name=$(basename "$unit")
    cp "$unit" "$root/etc/systemd/system/$name"
    if ! out=$(systemd-analyze verify --root="$root" --man=no --generators=no "$name" 2>&1) || [ -n "$out" ]; then
        fail "systemd-analyze verify $unit:"$'\n'"$out"
    fi
    echo "ok   $unit"
done

# Free TCP ports on loopback, one per line.
free_ports() {
    python3 -c 'import socket,sys
socks=[socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1",0))
print("\n".join(str(s.getsockname()[1]) for s in socks))' "$1"
}
mapfile -t ports < <(free_ports 4)
sp=${ports[0]} sa=${ports[1]} wp=${ports[2]} wa=${ports[3]}
export FERRY_ENDPOINTS=127.0.0.1:$sp

# Polls "$@" until it succeeds, up to $1 seconds.
wait_for() {
    local secs=$1; shift
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.5
    done
}
alive() { kill -0 "$1" 2>/dev/null; }
stops_cleanly() {  # pid name
    kill -TERM "$1"
    local rc=0
    wait "$1" || rc=$?
    [ $rc -eq 0 ] || fail "$2 exited $rc on SIGTERM (log: $tmp/$2.log)"$'\n'"$(tail -20 "$tmp/$2.log")"
}

step "deploy/scheduler.toml starts a scheduler"
"$bin" scheduler --config deploy/scheduler.toml --listen 127.0.0.1:$sp --advertise 127.0.0.1:$sp \
    --admin-listen 127.0.0.1:$sa --data "$tmp/scheduler" --initial-cluster 1=127.0.0.1:$sp \
    >"$tmp/scheduler.log" 2>&1 &
spid=$!
pids+=("$spid")
leader() { "$bin" cluster status | grep -q '^leader: 1 '; }
if ! wait_for 30 leader; then
    alive "$spid" || fail "the scheduler refused deploy/scheduler.toml:"$'\n'"$(tail -20 "$tmp/scheduler.log")"
    fail "the scheduler of deploy/scheduler.toml elected no leader in 30 s:"$'\n'"$(tail -20 "$tmp/scheduler.log")"
fi
echo "ok   deploy/scheduler.toml"

step "deploy/worker.toml starts a worker"
# Its paths under $tmp; every other key as written.
sed -e "s|/srv/ferry|$tmp/srv/ferry|g" -e "s|/var/lib/ferry/worker|$tmp/worker|g" deploy/worker.toml >"$tmp/worker.toml"
"$bin" worker --config "$tmp/worker.toml" --listen 127.0.0.1:$wp --advertise 127.0.0.1:$wp \
    --admin-listen 127.0.0.1:$wa --schedulers 127.0.0.1:$sp >"$tmp/worker.log" 2>&1 &
wpid=$!
pids+=("$wpid")
name=$(sed -n 's/^name = "\(.*\)"/\1/p' deploy/worker.toml)
registered() { "$bin" worker list | grep -E "^$name +127\.0\.0\.1:$wp +up .*role=web,zone=a"; }
if ! wait_for 30 registered; then
    alive "$wpid" || fail "the worker refused deploy/worker.toml:"$'\n'"$(tail -20 "$tmp/worker.log")"
    fail "the worker of deploy/worker.toml did not register as $name in 30 s:"$'\n'"$("$bin" worker list 2>&1)"$'\n'"$(tail -20 "$tmp/worker.log")"
fi
# The first [[config_files]] rule: key web/banner, raw, into web/banner.txt.
"$bin" config put web/banner "hello from test-systemd" >/dev/null
banner() { grep -qx "hello from test-systemd" "$tmp/srv/ferry/web/banner.txt"; }
wait_for 30 banner || fail "the worker did not write $tmp/srv/ferry/web/banner.txt from key web/banner"
echo "ok   deploy/worker.toml"

stops_cleanly "$wpid" worker
stops_cleanly "$spid" scheduler
pids=()
echo "test-systemd: PASS"
