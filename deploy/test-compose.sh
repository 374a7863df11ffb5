#!/usr/bin/env bash
# End-to-end test of the container deployment, as a user runs it:
#
#  1. builds the static binary (deploy/build-static.sh) and the image
#     (deploy/build-image.sh, ferry:dev);
#  2. makes the CA and the certificates with deploy/make-certs.sh, in a
#     temporary directory (FERRY_TLS_DIR), as a user runs it into deploy/tls;
#  3. starts deploy/compose.yaml (3 schedulers, 4 workers, every one with
#     TLS) under a project name of its own, and waits for a leader
#     (`ferry cluster status` from the host as the user admin, the
#     containers' addresses as --endpoints), four workers up and every
#     container healthy (the image's HEALTHCHECK);
#  4. checks TLS: `docker-compose exec worker-1 ferry cluster status` works
#     (the container's FERRY_TLS_* name the admin certificate), a plaintext
#     client in a container and a client whose certificate is not of the
#     cluster's CA are refused, a client without credentials exits 2, and
#     SIGHUP makes a scheduler reread its certificates without stopping;
#  5. writes a random file into worker 1's root (as the container's user),
#     pushes it with `ferry job submit ... --hook installed --wait` as
#     docs/guides/jobs.md shows, and checks every copy's sha256 and that
#     the hook ran on every target;
#  6. kills the leader's container (docker kill), waits for a new leader,
#     pushes a new version of the file (1 MiB of it changed) the same way
#     and checks every copy and hook again;
#  7. starts the killed scheduler again: it must rejoin on its volume;
#  8. tears everything down (docker-compose down -v), on failure too.
#
#   deploy/test-compose.sh        # needs docker, docker-compose, busybox-static
#
# Prints "test-compose: FAIL: ..." and exits 1 on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$SECONDS
fail() { echo "test-compose: FAIL: $*" >&2; exit 1; }
step() { echo "== test-compose [$((SECONDS - started))s]: $*"; }

for tool in docker docker-compose sha256sum; do
    command -v "$tool" >/dev/null || fail "$tool not found"
done
docker info >/dev/null 2>&1 || fail "the Docker engine is not running (docker info failed)"

SUBNET=172.26.26.0/24
export FERRY_ENDPOINTS=172.26.26.11:7001,172.26.26.12:7001,172.26.26.13:7001
export FERRY_IMAGE=${FERRY_IMAGE:-ferry:dev}
project=ferry-test-$$-$RANDOM
compose=(docker-compose --project-name "$project" --file deploy/compose.yaml)
tmp=$(mktemp -d)
# The certificates: compose.yaml mounts FERRY_TLS_DIR in every container;
# the CLI on the host is the user admin, as in the containers.
export FERRY_TLS_DIR=$tmp/tls
export FERRY_TLS_CA=$FERRY_TLS_DIR/ca.pem
export FERRY_TLS_CERT=$FERRY_TLS_DIR/user-admin.pem
export FERRY_TLS_KEY=$FERRY_TLS_DIR/user-admin-key.pem
unset FERRY_INSECURE

teardown() {
    local rc=$?
    trap - EXIT
    if [ $rc -ne 0 ] && [ -n "$("${compose[@]}" ps -q 2>/dev/null)" ]; then
        echo "== test-compose: containers and their last log lines" >&2
        "${compose[@]}" ps >&2 || true
        "${compose[@]}" logs --no-color --tail=15 >&2 || true
    fi
    echo "== test-compose: docker-compose down -v"
    "${compose[@]}" down -v --remove-orphans --timeout 10 >/dev/null 2>&1 \
        || echo "test-compose: WARNING: docker-compose down -v failed for project $project" >&2
    rm -rf "$tmp"
    echo "test-compose: $([ $rc -eq 0 ] && echo PASS || echo FAIL) in $((SECONDS - started)) s"
    exit $rc
}
trap teardown EXIT

step "build the static binary"
t=$SECONDS
bin=$(deploy/build-static.sh)
echo "static binary: $((SECONDS - t)) s"

step "build the image"
t=$SECONDS
deploy/build-image.sh >/dev/null
echo "image: $((SECONDS - t)) s"

step "make the certificates (deploy/make-certs.sh $FERRY_TLS_DIR)"
deploy/make-certs.sh "$FERRY_TLS_DIR" >/dev/null 2>"$tmp/certs.log" || fail "deploy/make-certs.sh failed:"$'\n'"$(cat "$tmp/certs.log")"
# Every key readable by the containers' group, none by others; the CA's
# key by its owner only.
for key in "$FERRY_TLS_DIR"/*-key.pem; do
    mode=$(stat -c '%a %g' "$key")
    case $key in
        */ca-key.pem) [ "$mode" = "600 10001" ] || fail "$key: mode and group $mode, want 600 10001" ;;
        *) [ "$mode" = "640 10001" ] || fail "$key: mode and group $mode, want 640 10001" ;;
    esac
done
echo "certificates: $(cd "$FERRY_TLS_DIR" && echo *.pem)"

# A network left on the subnet (another run, a crashed one) makes `up` fail
# with "Pool overlaps"; say which one.
for net in $(docker network ls -q); do
    if docker network inspect -f '{{range .IPAM.Config}}{{.Subnet}} {{end}}' "$net" | grep -qw "$SUBNET"; then
        fail "network $(docker network inspect -f '{{.Name}}' "$net") already uses $SUBNET (a cluster of deploy/compose.yaml still up? docker-compose -p PROJECT down -v)"
    fi
done

step "docker-compose up (project $project)"
"${compose[@]}" up -d --no-build >/dev/null 2>"$tmp/up.log" || fail "docker-compose up failed:"$'\n'"$(cat "$tmp/up.log")"

# Polls "$@" until it succeeds, up to $1 seconds.
wait_for() {
    local secs=$1; shift
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 1
    done
}
container() { "${compose[@]}" ps -q "$1"; }
leader_id() { "$bin" cluster status 2>/dev/null | sed -n 's/^leader: \([0-9][0-9]*\) .*/\1/p'; }
has_leader() { [ -n "$(leader_id)" ]; }
workers_up() { [ "$("$bin" worker list | awk '$1 ~ /^w[1-4]$/ && $3 == "up"' | wc -l)" -eq 4 ]; }
all_healthy() {
    local ids; ids=$("${compose[@]}" ps -q)
    [ "$(docker inspect -f '{{.State.Health.Status}}' $ids | grep -c '^healthy$')" -eq 7 ]
}

step "wait for a leader, four workers and seven healthy containers"
wait_for 60 has_leader || fail "no leader within 60 s:"$'\n'"$("$bin" cluster status 2>&1)"
"$bin" cluster status
wait_for 60 workers_up || fail "not four workers up within 60 s:"$'\n'"$("$bin" worker list 2>&1)"
"$bin" worker list
wait_for 60 all_healthy || fail "not every container healthy within 60 s (HEALTHCHECK on /healthz):"$'\n'"$(docker inspect -f '{{.Name}} {{.State.Health.Status}}' $("${compose[@]}" ps -q))"

w1=$(container worker-1)

step "TLS: the admin certificate works; plaintext and a foreign certificate are refused; SIGHUP"
out=$("${compose[@]}" exec -T worker-1 ferry cluster status 2>&1) \
    || fail "docker-compose exec worker-1 ferry cluster status failed:"$'\n'"$out"
grep -q '^leader: [0-9]' <<<"$out" || fail "docker-compose exec worker-1 ferry cluster status shows no leader:"$'\n'"$out"
echo "ok   docker-compose exec worker-1 ferry cluster status (user admin, from FERRY_TLS_*)"
# Runs "$@" expecting exit status $1; prints its output.
refused() {
    local want=$1 rc=0 out; shift
    out=$("$@" 2>&1) || rc=$?
    [ $rc -eq "$want" ] && ! grep -q '^leader:' <<<"$out" \
        || fail "want exit $want from: $*"$'\n'"exit $rc: $out"
    echo "$out" | tail -1
}
# In worker-1, without its FERRY_TLS_* (with them, --insecure is refused
# before any connection: "choose one").
refused 1 docker exec "$w1" env -u FERRY_TLS_CA -u FERRY_TLS_CERT -u FERRY_TLS_KEY \
    ferry --insecure --timeout 5s cluster status
# ... by the schedulers' TLS handshake, which says so in their logs.
schedulers_logged() { "${compose[@]}" logs --no-color scheduler-1 scheduler-2 scheduler-3 2>&1 | grep -q "$1"; }
wait_for 10 schedulers_logged 'TLS handshake refused.*InvalidContentType' \
    || fail "no scheduler logged 'TLS handshake refused ... InvalidContentType' for the plaintext client"
echo "ok   a plaintext client is refused"
"$bin" certs ca --dir "$tmp/other" --name other >/dev/null
"$bin" certs user --dir "$tmp/other" --name admin >/dev/null
refused 1 env FERRY_TLS_CERT="$tmp/other/user-admin.pem" FERRY_TLS_KEY="$tmp/other/user-admin-key.pem" \
    "$bin" --timeout 3s cluster status
wait_for 10 schedulers_logged 'TLS handshake refused.*UnknownIssuer' \
    || fail "no scheduler logged 'TLS handshake refused ... UnknownIssuer' for the certificate of another CA"
echo "ok   a user certificate of another CA is refused"
refused 2 env -u FERRY_TLS_CA -u FERRY_TLS_CERT -u FERRY_TLS_KEY "$bin" cluster status
echo "ok   a client without credentials exits 2"
# SIGHUP through tini (init: true): rereads the certificates, ends nothing.
s1=$(container scheduler-1)
docker kill -s HUP "$s1" >/dev/null
hup_logged() { docker logs "$s1" 2>&1 | grep -q 'TLS credentials unchanged'; }
wait_for 10 hup_logged || fail "scheduler-1 did not log 'TLS credentials unchanged' after SIGHUP:"$'\n'"$(docker logs --tail 10 "$s1" 2>&1)"
sleep 1
[ "$(docker inspect -f '{{.State.Running}} {{.RestartCount}}' "$s1")" = "true 0" ] \
    || fail "scheduler-1 stopped or restarted on SIGHUP:"$'\n'"$(docker logs --tail 10 "$s1" 2>&1)"
echo "ok   docker kill -s HUP scheduler-1: certificates reread, still running"

# Writes stdin to PATH in worker 1's root, as the container's user (10001),
# then renames it into place.
put_on_w1() {
    docker exec -i "$w1" sh -c 'mkdir -p "$(dirname "$1")" && cat > "$1.tmp" && mv "$1.tmp" "$1"' sh "$1"
}
# Pushes /srv/ferry/in/model.bin from w1 to w2-w4 exactly as
# docs/guides/jobs.md does, then checks each copy against $1 (a sha256) and
# that the hook logged the job on each target.
push_and_check() {
    local want=$1 out rc=0
    out=$("$bin" job submit --source w1 --file /srv/ferry/in/model.bin --to w2,w3,w4 \
        --dest /srv/ferry/pushed/ --hook installed --wait 2>&1) || rc=$?
    echo "$out"
    [ $rc -eq 0 ] || fail "ferry job submit exited $rc"
    local job
    job=$(sed -n 's/^job \([^:]*\): succeeded .*/\1/p' <<<"$out")
    [ -n "$job" ] || fail "the job's report does not say 'job ID: succeeded'"
    local got
    got=$(docker exec "$w1" sha256sum /srv/ferry/in/model.bin | cut -d' ' -f1)
    [ "$got" = "$want" ] || fail "w1: the source file changed: sha256 $got, want $want"
    for i in 2 3 4; do
        local c; c=$(container worker-$i)
        got=$(docker exec "$c" sha256sum /srv/ferry/pushed/model.bin 2>&1 | cut -d' ' -f1) \
            || fail "w$i: no /srv/ferry/pushed/model.bin: $got"
        [ "$got" = "$want" ] || fail "w$i: /srv/ferry/pushed/model.bin has sha256 $got, want $want"
        docker exec "$c" grep -qx "$job /srv/ferry/pushed/model.bin" /srv/ferry/hooks.log \
            || fail "w$i: the hook did not log job $job in /srv/ferry/hooks.log:"$'\n'"$(docker exec "$c" cat /srv/ferry/hooks.log 2>&1)"
        echo "ok   w$i: sha256 $got, hook ran for $job"
    done
}

step "push a random 8 MiB file from w1 to w2, w3, w4"
head -c 8M /dev/urandom >"$tmp/model.bin"
want=$(sha256sum "$tmp/model.bin" | cut -d' ' -f1)
put_on_w1 /srv/ferry/in/model.bin <"$tmp/model.bin"
push_and_check "$want"

old=$(leader_id)
step "docker kill the leader, scheduler-$old"
docker kill "$(container scheduler-$old)" >/dev/null
new_leader() { local l; l=$(leader_id); [ -n "$l" ] && [ "$l" != "$old" ]; }
wait_for 30 new_leader || fail "no new leader within 30 s of killing scheduler-$old:"$'\n'"$("$bin" cluster status 2>&1)"
"$bin" cluster status
[ "$(docker inspect -f '{{.State.Running}}' "$(container scheduler-$old)")" = false ] \
    || fail "scheduler-$old runs again: it was restarted, so the push would not test a cluster with a member down"
wait_for 30 workers_up || fail "not four workers up within 30 s of the leader change:"$'\n'"$("$bin" worker list 2>&1)"

step "push a new version (1 MiB changed) with scheduler-$old down"
head -c 1M /dev/urandom | dd of="$tmp/model.bin" bs=1M seek=3 conv=notrunc status=none
want=$(sha256sum "$tmp/model.bin" | cut -d' ' -f1)
put_on_w1 /srv/ferry/in/model.bin <"$tmp/model.bin"
push_and_check "$want"

step "start scheduler-$old again: it rejoins from its volume"
# The log it must reach: the leader's applied index now.
target=$("$bin" cluster status | awk '$4 == "leader" { print $5 }')
[ -n "$target" ] || fail "cluster status shows no leader's applied index:"$'\n'"$("$bin" cluster status 2>&1)"
"${compose[@]}" start "scheduler-$old" >/dev/null 2>&1 || fail "docker-compose start scheduler-$old failed"
rejoined() {
    "$bin" cluster status | awk -v id="$old" -v t="$target" \
        '$1 == id && ($4 == "follower" || $4 == "leader") && $5 + 0 >= t + 0' | grep -q .
}
wait_for 60 rejoined || fail "scheduler-$old did not rejoin and apply up to index $target within 60 s:"$'\n'"$("$bin" cluster status 2>&1)"
"$bin" cluster status
