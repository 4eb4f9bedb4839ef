#!/usr/bin/env bash
# Installs CRIU >= 4.0 as /usr/local/sbin/criu, built from Debian's own source package.
#
# Why: Nimbus checkpoints and restores sandboxed workers with CRIU. Debian bookworm ships
# CRIU 3.17, which fails on kernels >= 6.13 (their vDSO/vvar layout changed), and our
# machines run newer kernels. Newer Debian suites (trixie, sid) have CRIU 4.x, but their
# binary packages must not be mixed into bookworm. So this script:
#   1. exits at once if a criu >= 4.0 is already installed (on PATH or /usr/local/sbin);
#   2. installs the build dependencies from bookworm (never a binary from another suite);
#   3. adds a deb-src-only entry for the source suite in its own file under
#      /etc/apt/sources.list.d/, used (with a private list directory) only to locate the
#      source package, and removed again on exit;
#   4. downloads the source files with apt's own downloader, checking the SHA-256 sums from
#      the suite's signed index, unpacks them (with the Debian patches when the mirror
#      serves them; the pristine upstream .orig tarball otherwise), builds only the `criu`
#      binary (no docs, man pages, python bindings or test suite) with all cores, and
#      installs it with `make install-criu PREFIX=/usr/local`;
#   5. runs `criu check` and fails unless the installed criu reports >= 4.0.
# Environment: CRIU_SRC_SUITES (default "trixie sid": the first one that works is used).
# Runs as root, non-interactively; takes well under a minute on a 2-core machine.
set -euo pipefail

MIN_VERSION=4.0
PREFIX=/usr/local
CRIU_BIN="$PREFIX/sbin/criu"
SRC_SUITES=${CRIU_SRC_SUITES:-trixie sid}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
MIRROR=http://deb.debian.org/debian
export DEBIAN_FRONTEND=noninteractive

# Build dependencies (bookworm). Their runtime libraries stay installed: criu links them.
BUILD_DEPS=(build-essential pkgconf dpkg-dev xz-utils
  libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler
  libnl-3-dev libnet1-dev libcap-dev libbsd-dev libgnutls28-dev libnftables-dev uuid-dev
  python3 iproute2)

say() { echo "install-criu: $*"; }
die() { echo "install-criu: ERROR: $*" >&2; exit 1; }

# Prints the version that the criu binary $1 reports ("4.1.1"), or nothing.
criu_version() {
  "$1" --version 2>/dev/null | awk '/^Version:/ { print $2; exit }' || true
}
version_ok() { [ -n "$1" ] && dpkg --compare-versions "$1" ge "$MIN_VERSION"; }

# 1. Already installed?
for candidate in "$(command -v criu 2>/dev/null || true)" "$CRIU_BIN"; do
  [ -n "$candidate" ] && [ -x "$candidate" ] || continue
  v=$(criu_version "$candidate")
  if version_ok "$v"; then
    say "criu $v is already installed at $candidate (>= $MIN_VERSION); nothing to do."
    exit 0
  fi
  [ -n "$v" ] && say "found criu $v at $candidate, which is older than $MIN_VERSION"
done

[ "$(id -u)" -eq 0 ] || die "must run as root"
start=$(date +%s)

WORK=$(mktemp -d /tmp/install-criu.XXXXXX)
SRC_LIST=""
cleanup() {
  [ -n "$SRC_LIST" ] && rm -f "$SRC_LIST"
  rm -rf "$WORK"
}
trap cleanup EXIT

# 2. Build dependencies, from bookworm.
missing=()
for pkg in "${BUILD_DEPS[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing build dependencies from bookworm: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$WORK/apt-install.log" 2>&1 \
    || { tail -n 30 "$WORK/apt-install.log" >&2; die "apt-get install of the build dependencies failed"; }
else
  say "build dependencies already installed"
fi

# 3-4. Fetch the source package of the first suite that has CRIU >= 4.0 and serves it.
fetch_source() { # $1 = suite; leaves the unpacked tree at $WORK/src, prints its version
  local suite=$1 lists="$WORK/apt-$1" uris version orig="" debian="" dsc="" url file size hash kind
  SRC_LIST="/etc/apt/sources.list.d/nimbus-criu-src-$suite.sources"
  cat >"$SRC_LIST" <<EOF
# Temporary, written by Nimbus scripts/install-criu.sh to fetch CRIU's source package;
# deb-src only (no binary package comes from this suite). Removed when the script ends.
Types: deb-src
URIs: $MIRROR
Suites: $suite
Components: main
Signed-By: $KEYRING
EOF
  mkdir -p "$lists/lists/partial" "$lists/cache/archives/partial" "$lists/parts"
  # Only this file is read, and its index goes to a private directory: the system's apt
  # state is untouched.
  local apt_opts=(-o "Dir::Etc::SourceList=$SRC_LIST" -o "Dir::Etc::SourceParts=$lists/parts"
    -o "Dir::State::Lists=$lists/lists" -o "Dir::Cache=$lists/cache"
    -o "APT::Get::List-Cleanup=0" -o "APT::Sandbox::User=root")
  if ! apt-get "${apt_opts[@]}" update -qq >"$lists/update.log" 2>&1; then
    say "$suite: apt-get update of its deb-src index failed: $(grep -m1 '^E:' "$lists/update.log" || tail -n 1 "$lists/update.log")"
    rm -f "$SRC_LIST"; SRC_LIST=""; return 1
  fi
  uris=$(cd "$WORK" && apt-get "${apt_opts[@]}" source --print-uris --only-source criu 2>/dev/null | grep "^'" || true)
  version=$(sed -n 's/.* criu_\([^ ]*\)\.dsc .*/\1/p' <<<"$uris" | head -n 1)
  rm -f "$SRC_LIST"; SRC_LIST=""
  [ -n "$uris" ] || { say "$suite: no criu source package found"; return 1; }
  if ! version_ok "${version%%-*}"; then say "$suite: criu $version is older than $MIN_VERSION"; return 1; fi
  say "$suite has criu $version; downloading its source"
  mkdir -p "$WORK/dl"
  while read -r url file size hash; do
    url=${url//\'/}
    case "$file" in
      *.orig.tar.*) kind=orig ;;
      *.debian.tar.*) kind=debian ;;
      *.dsc) kind=dsc ;;
      *) continue ;;
    esac
    # apt-helper verifies the SHA-256 sum taken from the suite's signed index.
    if /usr/lib/apt/apt-helper -o APT::Sandbox::User=root download-file "$url" "$WORK/dl/$file" "$hash" >"$WORK/dl/$file.log" 2>&1; then
      printf -v "$kind" '%s' "$WORK/dl/$file"
    else
      say "$suite: could not download $file ($(grep -m1 -o 'E:.*' "$WORK/dl/$file.log" || echo failed))"
    fi
  done <<<"$uris"
  [ -n "$orig" ] || { say "$suite: the upstream tarball is unavailable"; return 1; }
  rm -rf "$WORK/src"
  if [ -n "$dsc" ] && [ -n "$debian" ]; then
    # Checksums were verified above; the .dsc's own signature needs a keyring we lack.
    dpkg-source --no-check -x "$dsc" "$WORK/src" >"$WORK/dl/dpkg-source.log" 2>&1 \
      || { cat "$WORK/dl/dpkg-source.log" >&2; return 1; }
    say "unpacked Debian source package $version (Debian patches applied)"
  else
    mkdir -p "$WORK/src"
    tar -xf "$orig" -C "$WORK/src" --strip-components=1
    say "the mirror does not serve the Debian packaging for $version; building its pristine upstream tarball ($(basename "$orig"))"
  fi
  echo "$version" >"$WORK/version"
}

fetched=""
for suite in $SRC_SUITES; do
  if fetch_source "$suite"; then fetched=$suite; break; fi
  say "$suite did not work out; trying the next suite, if any"
done
[ -n "$fetched" ] || die "could not fetch a criu >= $MIN_VERSION source package from any of: $SRC_SUITES"

# Build only the criu binary (no docs/man, python bindings, plugins or zdtm), then install.
jobs=$(nproc)
say "building criu $(cat "$WORK/version") with $jobs jobs"
(cd "$WORK/src" && make -j"$jobs" PREFIX="$PREFIX" criu) >"$WORK/build.log" 2>&1 \
  || { tail -n 40 "$WORK/build.log" >&2; die "make criu failed"; }
(cd "$WORK/src" && make PREFIX="$PREFIX" install-criu) >>"$WORK/build.log" 2>&1 \
  || { tail -n 40 "$WORK/build.log" >&2; die "make install-criu failed"; }

# 5. Check the result.
v=$(criu_version "$CRIU_BIN")
say "installed $CRIU_BIN: version ${v:-unknown} (from $fetched's source package) in $(( $(date +%s) - start ))s"
if "$CRIU_BIN" check >"$WORK/check.log" 2>&1; then
  say "criu check: $(tr '\n' ' ' <"$WORK/check.log")"
else
  say "criu check reported problems:"; cat "$WORK/check.log"
fi
version_ok "$v" || die "the installed criu reports '${v:-nothing}', not >= $MIN_VERSION"
on_path=$(command -v criu 2>/dev/null || true)
[ "$on_path" = "$CRIU_BIN" ] || say "note: 'criu' on PATH is '${on_path:-none}'; use $CRIU_BIN"
