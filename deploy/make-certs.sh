#!/usr/bin/env bash
# Makes the certificates deploy/compose.yaml needs, with the image's own
# `ferry certs` (nothing to install on the host but docker): the cluster's
# CA, one certificate per service, and the user `admin` for the CLI.
#
#   deploy/build-image.sh            # the image, ferry:dev
#   deploy/make-certs.sh             # -> deploy/tls/, which compose.yaml mounts
#   deploy/make-certs.sh DIR         # elsewhere; then FERRY_TLS_DIR=DIR docker-compose up -d
#                                    # (DIR absolute: compose reads it from deploy/)
#
# DIR (created if missing) then holds, as docs/operations/security.md
# describes:
#   ca.pem, ca-key.pem                 the CA; its key stays on this host
#   scheduler-N.pem, -key.pem          N = 1, 2, 3: names scheduler N, and
#                                      (--host) 172.26.26.1N and scheduler-N,
#                                      for grpcurl
#   worker-wN.pem, -key.pem            N = 1 to 4: names worker wN
#   user-admin.pem, -key.pem           the CLI's: FERRY_TLS_* in every container
#
# Every file is owned by you, with group 10001, the image's user and group:
# DIR 0750, certificates 0644, keys 0640, so the containers read them and
# nobody else on this host does (check that no host group has gid 10001);
# ca-key.pem stays 0600 (no container can read it). deploy/tls gets a
# .gitignore of its own. Run again, it keeps what is there and issues what is missing; to
# start over, delete DIR (a new CA needs new certificates everywhere).
# Needs a docker engine that runs containers as the host's uids (not
# rootless docker, no userns-remap).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
image=${FERRY_IMAGE:-ferry:dev}

fail() { echo "make-certs: FAIL: $*" >&2; exit 1; }

[ $# -le 1 ] || fail "usage: $0 [DIR]"
dir=${1:-$here/tls}
command -v docker >/dev/null || fail "docker not found"
docker image inspect "$image" >/dev/null 2>&1 || fail "no image $image (deploy/build-image.sh builds it)"
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
# `docker-compose up` before this script makes the directory as root.
[ -w "$dir" ] && [ -O "$dir" ] || fail "$dir is not yours (made by docker-compose up before this script?): remove it, then run again"
# The default directory is in the repository: keep it out of git.
[ "$dir" != "$here/tls" ] || echo '*' >"$dir/.gitignore"

# Runs in the image (busybox sh), as you with the image's group, so the
# files are yours and the group is one the containers have.
script='
set -e
cd /tls
chgrp 10001 . && chmod 0750 .
have() { [ -e "$1.pem" ] && [ -e "$1-key.pem" ]; }
[ -e ca.pem ] || ferry certs ca --dir . --name compose
for i in 1 2 3; do
    have scheduler-$i || ferry certs scheduler --dir . --id $i --host 172.26.26.1$i --host scheduler-$i
done
for w in w1 w2 w3 w4; do
    have worker-$w || ferry certs worker --dir . --name $w
done
have user-admin || ferry certs user --dir . --name admin
chgrp 10001 *.pem
chmod 0640 *-key.pem
chmod 0600 ca-key.pem
'
docker run --rm --network none --user "$(id -u):10001" -v "$dir:/tls" \
    --entrypoint /bin/sh "$image" -c "$script" | sed 's/^/make-certs: /'
for f in ca scheduler-1 scheduler-2 scheduler-3 worker-w1 worker-w2 worker-w3 worker-w4 user-admin; do
    [ -s "$dir/$f.pem" ] && [ -s "$dir/$f-key.pem" ] || fail "$dir/$f.pem or $dir/$f-key.pem was not written"
done
echo "make-certs: $dir holds the CA and the certificates of deploy/compose.yaml" >&2
