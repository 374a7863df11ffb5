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
BASE=${FERRY_UPGRADE_BASE:-d215c6df6ea9c2621d9afc0e4db4ad72334918b3}   # 0.1.0: the last commit before 0.2.0
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
exit $failed
