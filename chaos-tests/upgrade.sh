#!/usr/bin/env bash
# The upgrade test (docs/operations/upgrades.md): builds the previous
# release of ferry from git beside this tree, then runs the rolling-upgrade
# and the two mixed-version scenarios of ferry-chaos with it.
#
#   bash chaos-tests/upgrade.sh               # CI's run: 90 s each, debug builds
#   DURATION=5m PROFILE=release bash chaos-tests/upgrade.sh
#
# The previous release is pinned by commit (tags may not travel with a
# clone). It is checked out as a git worktree under target/upgrade/ and
# built into this tree's target directory under another binary name
# (`ferry-base`), so it shares the dependencies already built and never
# replaces target/*/ferry.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${FERRY_UPGRADE_BASE:-98dd568e9f770aefdd1819d73e4abd2c685542fc}   # 0.2.0: the last commit before 0.3.0
DURATION=${DURATION:-90s}
PROFILE=${PROFILE:-debug}
SEED=${SEED:-1}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
flags=(--locked)
[ "$PROFILE" = release ] && flags+=(--release)

src=target/upgrade/base-$BASE
if [ ! -d "$src" ]; then
    git cat-file -e "$BASE^{commit}" 2>/dev/null \
        || { echo "upgrade.sh: commit $BASE (the previous release) is not in this clone; fetch the full history" >&2; exit 2; }
    git worktree prune
    git worktree add --detach --force "$src" "$BASE" >/dev/null
    # Its binary under another name, so it never replaces this tree's.
    python3 - "$src/cli/Cargo.toml" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
s = s.replace('[[bin]]\nname = "ferry"\n', '[[bin]]\nname = "ferry-base"\n', 1)
open(p, 'w').write(s)
PY
fi
echo "== building the previous release ($BASE) as ferry-base"
cargo build "${flags[@]}" --manifest-path "$src/Cargo.toml" -p ferry --features failpoints
echo "== building this tree"
cargo build "${flags[@]}" -p ferry -p ferry-chaos --features ferry/failpoints

bin=$CARGO_TARGET_DIR/$PROFILE
"$bin/ferry-base" --version
"$bin/ferry" --version
failed=0
for scenario in rolling-upgrade mixed-old-majority mixed-new-majority; do
    "$bin/ferry-chaos" run "$scenario" --from "$bin/ferry-base" --ferry "$bin/ferry" \
        --duration "$DURATION" --seed "$SEED" || failed=1
done

echo "== going back: the previous release on a data directory where this release forgot jobs"
# The previous release has no TLS: this one runs plaintext beside it (the
# daemons by flag; the CLI by FERRY_INSECURE, which daemons ignore).
export FERRY_INSECURE=true
dir=$(mktemp -d)
cleanup() { pkill -f -- "--data $dir/" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
s=127.0.0.1:$(port)
mkdir -p "$dir/r1" "$dir/r2"
"$bin/ferry" scheduler --insecure --id 1 --listen "$s" --initial-cluster "1=$s" --data "$dir/s1" --job-history 1 \
    >"$dir/s1.log" 2>&1 &
for w in 1 2; do
    "$bin/ferry" worker --insecure --name "w$w" --listen "127.0.0.1:$(port)" --schedulers "$s" --allow-root "$dir/r$w" \
        --data "$dir/w$w/" >"$dir/w$w.log" 2>&1 &
done
head -c 100K /dev/urandom >"$dir/r1/a.bin"
for _ in $(seq 150); do
    up=$("$bin/ferry" --endpoints "$s" --json worker list 2>/dev/null | grep -o '"state":"up"' | wc -l || true)
    [ "$up" = 2 ] && break
    sleep 0.2
done
for i in 1 2 3; do
    "$bin/ferry" --endpoints "$s" job submit --source w1 --file "$dir/r1/a.bin" --to w2 --dest "$dir/r2/" --wait >/dev/null
done
for _ in $(seq 100); do grep -q "forgot the oldest finished jobs" "$dir/s1.log" && break; sleep 0.2; done
grep -q "forgot the oldest finished jobs" "$dir/s1.log" || { echo "FAIL: this release did not forget jobs"; exit 1; }
pkill -f -- "--data $dir/" || true
for _ in $(seq 150); do pgrep -f -- "--data $dir/" >/dev/null || break; sleep 0.2; done
# The previous release either refuses the directory (exit 1, naming the
# command kind it does not know: what a release with a new one must make it
# do) or, when this release added none, serves it as it is.
"$bin/ferry-base" scheduler --id 1 --listen "$s" --data "$dir/s1" >"$dir/base.log" 2>&1 &
base=$!
listed=""
for _ in $(seq 150); do
    kill -0 "$base" 2>/dev/null || break
    listed=$("$bin/ferry-base" --endpoints "$s" --json job list 2>/dev/null | grep -o '"job_id"' | wc -l || true)
    [ "$listed" = 1 ] && break
    sleep 0.2
done
if kill -0 "$base" 2>/dev/null; then
    if [ "$listed" = 1 ]; then
        echo "PASS: the previous release serves it: the one job this release kept"
    else
        echo "FAIL: the previous release runs on it but lists $listed jobs (1 kept):"
        tail -20 "$dir/base.log"
        failed=1
    fi
    kill "$base" 2>/dev/null || true
else
    code=0
    wait "$base" || code=$?
    if [ "$code" = 1 ] && grep -q "command kind unknown to ferry" "$dir/base.log"; then
        echo "PASS: the previous release refuses it: $(grep -o 'cannot decode.*upgrade' "$dir/base.log" | head -1)"
    else
        echo "FAIL: the previous release exited $code on a directory of this release:"
        cat "$dir/base.log"
        failed=1
    fi
fi
exit $failed
