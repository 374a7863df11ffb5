#!/usr/bin/env bash
# Builds the one static `ferry` binary (glibc linked in with crt-static; no
# shared library needed at run time, so it runs on any x86_64 Linux and in a
# FROM scratch image), then checks that it is static and prints its path.
#
#   deploy/build-static.sh        # -> target/x86_64-unknown-linux-gnu/release/ferry
#
# The build is the one documented command (docs/operations/install.md):
#   RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked -p ferry --target x86_64-unknown-linux-gnu
# `--target` keeps RUSTFLAGS off build scripts and proc macros, which must
# stay dynamic. CARGO_TARGET_DIR is honoured (default: the repository's target/).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=x86_64-unknown-linux-gnu

RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked -p ferry --target "$TARGET" >&2

dir=${CARGO_TARGET_DIR:-target}
case $dir in /*) ;; *) dir=$PWD/$dir ;; esac
bin=$dir/$TARGET/release/ferry

fail() { echo "build-static: FAIL: $*" >&2; exit 1; }
[ -x "$bin" ] || fail "$bin was not built"
desc=$(file -b "$bin")
case $desc in
    *"statically linked"* | *"static-pie linked"*) ;;
    *) fail "$bin is not static: file says: $desc" ;;
esac
# ldd exits non-zero on a static binary ("not a dynamic executable"), or
# prints "statically linked" for a static PIE; any "=>" is a shared library.
if ldd_out=$(ldd "$bin" 2>&1) && grep -q '=>' <<<"$ldd_out"; then
    fail "$bin needs shared libraries: $ldd_out"
fi
"$bin" --version >/dev/null || fail "$bin --version failed"
echo "build-static: $bin is static ($(du -h "$bin" | cut -f1)): ${desc%%,*}, $(grep -o 'static[a-z-]* linked' <<<"$desc")" >&2
echo "$bin"
