#!/usr/bin/env bash
# Builds the previous release's binaries (sharddb-operator, sharddb-router, sharddb-shard-server)
# from the git history, for the upgrade test (tests/tests/upgrade.rs), and prints the directory
# holding them. The release is the commit pinned in tests/previous-release; move the pin when a
# release is cut.
#
# The commit's tree is exported with `git archive` (no worktree, nothing written under .git) into
# target/previous-release/src and built with its own Cargo.lock into target/previous-release/target,
# kept between runs: a second build of the same commit, or of the next pinned one, reuses every
# dependency. The first time, that target directory starts with this checkout's compiled
# dependencies (same lock file, same features, so cargo reuses them as they are and compiles only
# the release's own crates): hard links to the libraries, which are only ever replaced whole, and
# copies of the small build-script outputs and fingerprints, which cargo rewrites in place. No
# incremental state is kept (it is only good for rebuilding edited code). The binaries land in
# target/previous-release/<commit>/, which is the cache: when it exists nothing is built.
# Concurrent runs wait for each other (flock).
#
# With --release it builds optimized binaries instead (into target/previous-release/<commit>-release,
# starting from this checkout's target/release), for the benchmark's before/after variant:
#   bench --variant "previous=--bin-dir=$(scripts/build-previous-release.sh --release)"
#
# Needs the pinned commit in the local history: CI checks out with `fetch-depth: 0`, and a shallow
# clone is deepened from its origin first.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=debug
CARGO_PROFILE=()
SUFFIX=
case "${1:-}" in
  "") ;;
  --release) PROFILE=release; CARGO_PROFILE=(--release); SUFFIX=-release ;;
  *) echo "usage: $0 [--release]" >&2; exit 2 ;;
esac

COMMIT=$(tr -d '[:space:]' < tests/previous-release)
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BASE=$TARGET/previous-release
OUT=$BASE/$COMMIT$SUFFIX
BINS=(sharddb-operator sharddb-router sharddb-shard-server)

built() {
  for b in "${BINS[@]}"; do [[ -x $OUT/$b ]] || return 1; done
}

if built; then echo "$OUT"; exit 0; fi
mkdir -p "$BASE"
exec 9>"$BASE/.lock"
flock 9
if built; then echo "$OUT"; exit 0; fi

if ! git cat-file -e "$COMMIT^{commit}" 2>/dev/null; then
  # A shallow clone: fetch the history (or at least the commit) from where this one came from.
  git fetch --quiet --unshallow 2>/dev/null || git fetch --quiet origin "$COMMIT" 2>/dev/null || true
fi
if ! git cat-file -e "$COMMIT^{commit}" 2>/dev/null; then
  echo "build-previous-release: commit $COMMIT (tests/previous-release) is not in this repository's history;" \
       "fetch the full history (git fetch --unshallow; in GitHub Actions, actions/checkout with fetch-depth: 0)" >&2
  exit 1
fi

SRC=$BASE/src
rm -rf "$SRC"
mkdir -p "$SRC"
git archive --format=tar "$COMMIT" | tar -x -C "$SRC"

PREV_TARGET=$BASE/target
if [[ ! -d $PREV_TARGET/$PROFILE/deps && -d $TARGET/$PROFILE/deps ]]; then
  mkdir -p "$PREV_TARGET/$PROFILE"
  cp -al "$TARGET/$PROFILE/deps" "$PREV_TARGET/$PROFILE/deps" 2>/dev/null || cp -a "$TARGET/$PROFILE/deps" "$PREV_TARGET/$PROFILE/deps"
  for d in build .fingerprint; do
    if [[ -d $TARGET/$PROFILE/$d ]]; then cp -a "$TARGET/$PROFILE/$d" "$PREV_TARGET/$PROFILE/$d"; fi
  done
fi

echo "build-previous-release: building $COMMIT into $PREV_TARGET (once; cached in $OUT)" >&2
(cd "$SRC" && CARGO_TARGET_DIR=$PREV_TARGET CARGO_INCREMENTAL=0 cargo build "${CARGO_PROFILE[@]}" --workspace --bins --locked >&2)

mkdir -p "$OUT.partial"
for b in "${BINS[@]}"; do cp "$PREV_TARGET/$PROFILE/$b" "$OUT.partial/$b"; done
rm -rf "$OUT"
mv "$OUT.partial" "$OUT"
rm -rf "$SRC"
echo "$OUT"
