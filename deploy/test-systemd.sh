#!/usr/bin/env bash
# Checks the files a systemd install uses, without systemd running:
# 1. `systemd-analyze verify` of deploy/systemd/*.service in a temporary
#    root holding the static binary at /usr/local/bin/ferry (the host is
#    not touched); any message at all is a failure (verify exits 0 on an
#    unknown key).
# 2. deploy/scheduler.toml and deploy/worker.toml, as the units load them,
#    with TLS: certificates made by `ferry certs` in a temporary directory
#    stand in for /etc/ferry/tls (each TOML's copy names them there; every
#    other key as written). A one-node cluster from the scheduler example
#    (flags override only its addresses and data directory), and a worker
#    from the worker example (its paths moved under the temporary
#    directory, its addresses overridden) that must register with its
#    name and labels and write the config file of its first
#    [[config_files]] rule. The CLI uses a user certificate; without one
#    (plaintext) it is refused. SIGHUP, the units' ExecReload, must keep
#    both running and make the scheduler take a reissued certificate. Both
#    must stop cleanly (exit 0) on SIGTERM.
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
# ExecReload=/bin/kill: verify wants it executable in the root too (/bin as
# on a merged-/usr host).
mkdir -p "$root/usr/bin"
cp "$(type -P kill)" "$root/usr/bin/kill"   # the program, not the builtin
ln -s usr/bin "$root/bin"
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
# The daemons read FERRY_TLS_* and FERRY_INSECURE too (over their [tls]):
# none from the caller's environment; the CLI gets its own below.
unset FERRY_TLS_CA FERRY_TLS_CERT FERRY_TLS_KEY FERRY_INSECURE

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

step "certificates for the examples' [tls] (ferry certs)"
# What the operator copies to /etc/ferry/tls: the CA, the scheduler of
# scheduler.toml (its id), the worker of worker.toml (its name), and a user.
tls=$tmp/tls
toml_value() { sed -n "s/^$1 = \"\{0,1\}\([^\"]*\)\"\{0,1\}\$/\1/p" "$2"; }
id=$(toml_value id deploy/scheduler.toml)
name=$(toml_value name deploy/worker.toml)
[ -n "$id" ] && [ -n "$name" ] || fail "no id in deploy/scheduler.toml or no name in deploy/worker.toml"
"$bin" certs ca --dir "$tls" >/dev/null
"$bin" certs scheduler --dir "$tls" --id "$id" >/dev/null
"$bin" certs worker --dir "$tls" --name "$name" >/dev/null
"$bin" certs user --dir "$tls" --name ci >/dev/null
for toml in scheduler worker; do
    grep -q '^ca = "/etc/ferry/tls/ca.pem"$' deploy/$toml.toml || fail "deploy/$toml.toml: no [tls] ca = \"/etc/ferry/tls/ca.pem\""
done
grep -qx "cert = \"/etc/ferry/tls/scheduler-$id.pem\"" deploy/scheduler.toml \
    || fail "deploy/scheduler.toml: [tls] cert is not /etc/ferry/tls/scheduler-$id.pem, the file \`ferry certs scheduler --id $id\` writes"
grep -qx "cert = \"/etc/ferry/tls/worker-$name.pem\"" deploy/worker.toml \
    || fail "deploy/worker.toml: [tls] cert is not /etc/ferry/tls/worker-$name.pem, the file \`ferry certs worker --name $name\` writes"
echo "ok   CA, scheduler $id, worker $name, user ci in $tls"
# Client commands, as the user ci.
cli() { FERRY_TLS_CA=$tls/ca.pem FERRY_TLS_CERT=$tls/user-ci.pem FERRY_TLS_KEY=$tls/user-ci-key.pem "$bin" "$@"; }

step "deploy/scheduler.toml starts a scheduler"
# Only the TLS files moved under $tmp; every other key as written.
sed -e "s|/etc/ferry/tls/|$tls/|g" deploy/scheduler.toml >"$tmp/scheduler.toml"
"$bin" scheduler --config "$tmp/scheduler.toml" --listen 127.0.0.1:$sp --advertise 127.0.0.1:$sp \
    --admin-listen 127.0.0.1:$sa --data "$tmp/scheduler" --initial-cluster "$id=127.0.0.1:$sp" \
    >"$tmp/scheduler.log" 2>&1 &
spid=$!
pids+=("$spid")
leader() { cli cluster status | grep -q "^leader: $id "; }
if ! wait_for 30 leader; then
    alive "$spid" || fail "the scheduler refused deploy/scheduler.toml:"$'\n'"$(tail -20 "$tmp/scheduler.log")"
    fail "the scheduler of deploy/scheduler.toml elected no leader in 30 s:"$'\n'"$(tail -20 "$tmp/scheduler.log")"
fi
echo "ok   deploy/scheduler.toml"

step "deploy/worker.toml starts a worker"
# Its paths under $tmp; every other key as written.
sed -e "s|/srv/ferry|$tmp/srv/ferry|g" -e "s|/var/lib/ferry/worker|$tmp/worker|g" -e "s|/etc/ferry/tls/|$tls/|g" \
    deploy/worker.toml >"$tmp/worker.toml"
"$bin" worker --config "$tmp/worker.toml" --listen 127.0.0.1:$wp --advertise 127.0.0.1:$wp \
    --admin-listen 127.0.0.1:$wa --schedulers 127.0.0.1:$sp >"$tmp/worker.log" 2>&1 &
wpid=$!
pids+=("$wpid")
registered() { cli worker list | grep -E "^$name +127\.0\.0\.1:$wp +up .*role=web,zone=a"; }
if ! wait_for 30 registered; then
    alive "$wpid" || fail "the worker refused deploy/worker.toml:"$'\n'"$(tail -20 "$tmp/worker.log")"
    fail "the worker of deploy/worker.toml did not register as $name in 30 s:"$'\n'"$(cli worker list 2>&1)"$'\n'"$(tail -20 "$tmp/worker.log")"
fi
# The first [[config_files]] rule: key web/banner, raw, into web/banner.txt.
cli config put web/banner "hello from test-systemd" >/dev/null
banner() { grep -qx "hello from test-systemd" "$tmp/srv/ferry/web/banner.txt"; }
wait_for 30 banner || fail "the worker did not write $tmp/srv/ferry/web/banner.txt from key web/banner"
echo "ok   deploy/worker.toml"

step "TLS: no plaintext client; SIGHUP (ExecReload) reloads, ends nothing"
rc=0
out=$("$bin" --insecure --timeout 3s cluster status 2>&1) || rc=$?
[ $rc -ne 0 ] && ! grep -q '^leader:' <<<"$out" \
    || fail "a plaintext client was answered (exit $rc):"$'\n'"$out"
echo "ok   plaintext client refused (exit $rc)"
# Reissued as an operator rotates it: new files in place of the old.
"$bin" certs scheduler --dir "$tls" --id "$id" >/dev/null
kill -HUP "$spid" "$wpid"
logged() { grep -q "$1" "$2"; }
wait_for 10 logged "TLS credentials reloaded" "$tmp/scheduler.log" \
    || fail "no 'TLS credentials reloaded' in the scheduler's log after SIGHUP:"$'\n'"$(tail -20 "$tmp/scheduler.log")"
wait_for 10 logged "TLS credentials unchanged" "$tmp/worker.log" \
    || fail "no 'TLS credentials unchanged' in the worker's log after SIGHUP:"$'\n'"$(tail -20 "$tmp/worker.log")"
alive "$spid" || fail "the scheduler ended on SIGHUP:"$'\n'"$(tail -20 "$tmp/scheduler.log")"
alive "$wpid" || fail "the worker ended on SIGHUP:"$'\n'"$(tail -20 "$tmp/worker.log")"
# A new connection, under the reissued certificate.
wait_for 10 registered || fail "after SIGHUP the cluster no longer answers:"$'\n'"$(cli worker list 2>&1)"
echo "ok   SIGHUP: the scheduler took its new certificate, the worker kept its own, both run"

stops_cleanly "$wpid" worker
stops_cleanly "$spid" scheduler
pids=()
echo "test-systemd: PASS"
