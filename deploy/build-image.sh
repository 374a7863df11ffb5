#!/usr/bin/env bash
# Builds the `ferry` container image (deploy/Dockerfile, FROM scratch) from a
# small staging directory: the static binary (built by deploy/build-static.sh,
# its debug info stripped), and the static busybox of Debian's
# busybox-static package as /bin/sh and its applets.
#
#   deploy/build-image.sh              # -> ferry:dev
#   FERRY_IMAGE=ferry:1.2 deploy/build-image.sh
#
# Needs docker, and /bin/busybox from busybox-static (apt-get install busybox-static).
set -euo pipefail
cd "$(dirname "$0")/.."
image=${FERRY_IMAGE:-ferry:dev}
busybox=${BUSYBOX:-/bin/busybox}

fail() { echo "build-image: FAIL: $*" >&2; exit 1; }
[ -x "$busybox" ] || fail "$busybox missing: apt-get install busybox-static"
file -L "$busybox" | grep -q 'statically linked' || fail "$busybox is not static: apt-get install busybox-static"

bin=$(deploy/build-static.sh)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/rootfs/usr/local/bin" "$stage/rootfs/bin" "$stage/rootfs/tmp" "$stage/empty"
chmod 1777 "$stage/rootfs/tmp"
# Debug info is line tables only, but it is three quarters of the file.
objcopy --strip-debug "$bin" "$stage/rootfs/usr/local/bin/ferry"
cp "$busybox" "$stage/rootfs/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$stage/rootfs/bin/$applet"
done

docker build -q -t "$image" -f deploy/Dockerfile "$stage" >/dev/null
echo "build-image: $image ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))" >&2
echo "$image"
