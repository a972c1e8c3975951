#!/usr/bin/env bash
# Builds the outboxd release from before table-keyed checkpoints (commit
# 0ac26db: checkpoints keyed by relay.name, transactional id
# `outboxd-<relay.name>`) into a cache outside the repository, and prints the
# binary's path on stdout. Does nothing but print it when it is cached.
#
#   OUTBOXD_OLD_BINARY=$(bash scripts/old-release.sh) cargo test --test faults versions -- --ignored
#
# The mixed-version fault tests (tests/faults/versions.rs, `make
# test-versions`) run it beside today's binary. Its source comes from `git
# archive`, so the repository's worktrees and branches are left alone; it
# builds with the same system dependencies as today's release
# (deploy/local/install-deps.sh), with its own Cargo.lock (--locked) and
# its own CARGO_TARGET_DIR in the cache.
#
#   OUTBOXD_OLD_COMMIT  the commit to build (default 0ac26db)
#   OUTBOXD_CACHE_DIR   the cache (default ${XDG_CACHE_HOME:-$HOME/.cache}/outboxd)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$here/.."
commit=${OUTBOXD_OLD_COMMIT:-0ac26db}
cache=${OUTBOXD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/outboxd}
dir="$cache/old-$commit"
binary="$dir/bin/outboxd"

say() { echo "old-release: $*" >&2; }

if [[ -x "$binary" ]]; then
  echo "$binary"
  exit 0
fi

git -C "$root" rev-parse --verify --quiet "$commit^{commit}" >/dev/null \
  || { say "commit $commit is not in this repository"; exit 1; }
mkdir -p "$dir"
# A fresh copy of the source each time the binary is missing (an interrupted
# build keeps its target/, so cargo goes on where it stopped).
rm -rf "$dir/src.tmp"
mkdir -p "$dir/src.tmp"
git -C "$root" archive --format=tar "$commit" | tar -x -C "$dir/src.tmp"
rm -rf "$dir/src"
mv "$dir/src.tmp" "$dir/src"

say "building outboxd $commit in $dir (its own target/; a few minutes on first use)"
(
  cd "$dir/src"
  CARGO_TARGET_DIR="$dir/target" ${CARGO:-cargo} build --locked --bin outboxd >&2
)
mkdir -p "$dir/bin"
cp "$dir/target/debug/outboxd" "$binary.tmp"
mv "$binary.tmp" "$binary"
say "built $binary ($("$binary" --version))"
echo "$binary"
