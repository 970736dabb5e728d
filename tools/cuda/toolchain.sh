#!/usr/bin/env bash
# Fetches NVRTC 12.4 and the CUDA binary tools (ptxas, cuobjdump, nvdisasm) from Debian 13 (trixie)
# non-free into a per-user folder, without installing anything and without touching the system's apt
# configuration: a private apt state in a temporary folder downloads the .deb files, dpkg-deb extracts
# the few members we use. Idempotent: when $DIR/VERSION matches the series below it exits at once, offline.
#
#   $DIR/lib   libnvrtc.so.12*, libnvrtc-builtins.so.12.4* (the soname symlinks kept)
#   $DIR/bin   ptxas, cuobjdump, nvdisasm
#   DIR = $DSCUDA_TOOLCHAIN, else ${XDG_CACHE_HOME:-~/.cache}/deepseekcuda/cuda-12.4
#   (Engine/Cuda/Native/NativeLibraries.cs computes the same folder and searches $DIR/lib last.)
set -euo pipefail

# --- The pins: the one place that names versions. ---
# Any Debian revision of the 12.4 series is taken (a stable-release update must not break CI); the stamp
# records the exact versions fetched (12.4.127~12.4.1-2 and 12.4.131~12.4.1-2 when this was written).
SUITE=trixie
NVRTC_SERIES='12.4'                 # libnvrtc12 and libnvrtc-builtins12.4: 12.4.*; libnvrtc.so.12 -> libnvrtc.so.12.4.*
TOOLKIT_SERIES='12.4'               # nvidia-cuda-toolkit: 12.4.*

DIR=${DSCUDA_TOOLCHAIN:-${XDG_CACHE_HOME:-$HOME/.cache}/deepseekcuda/cuda-12.4}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

die() { echo "toolchain.sh: $*" >&2; exit 1; }

# VERSION holds one "package version" line per package; the pinned libs must match exactly.
stamp_ok() {
  local f=$1
  [ -f "$f" ] || return 1
  grep -qE "^libnvrtc12 ${NVRTC_SERIES//./\\.}\.[0-9]" "$f" &&
    grep -qE "^libnvrtc-builtins$NVRTC_SERIES ${NVRTC_SERIES//./\\.}\.[0-9]" "$f" &&
    grep -qE "^nvidia-cuda-toolkit ${TOOLKIT_SERIES//./\\.}\.[0-9]" "$f"
}
report() { echo "$DIR: $(paste -sd ';' "$DIR/VERSION" | sed 's/;/, /g')"; }

if stamp_ok "$DIR/VERSION"; then report; exit 0; fi

[ "$(uname -m)" = x86_64 ] || die "only x86_64 is supported (Debian's amd64 packages); this is $(uname -m)"
for tool in apt-get dpkg-deb tar; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is required (this script uses Debian's packages without installing them)"
done
[ -r "$KEYRING" ] || die "$KEYRING is missing (Debian's debian-archive-keyring package) and is needed to verify the download"

parent=$(dirname "$DIR")
mkdir -p "$parent"
# Two runs at once (parallel CI jobs) take turns; the second then finds the stamp.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$parent/.$(basename "$DIR").lock"
  flock 9
  if stamp_ok "$DIR/VERSION"; then report; exit 0; fi
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/dscuda-toolchain.XXXXXX")
new=$(mktemp -d "$parent/.$(basename "$DIR").new.XXXXXX")   # beside DIR, so the final rename stays on one file system
old=""
trap 'rm -rf "$work" "$new" ${old:+"$old"}' EXIT

# --- A private apt: its own sources, lists, cache and an empty dpkg status. ---
mkdir -p "$work"/{lists/partial,cache/archives/partial,parts,debs}
echo "deb [signed-by=$KEYRING] http://deb.debian.org/debian $SUITE non-free" >"$work/sources.list"
: >"$work/status"
apt_opts=(
  -o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=$work/parts"
  -o "Dir::Etc::Preferences=$work/parts/none" -o "Dir::Etc::PreferencesParts=$work/parts"
  -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o "Dir::State::status=$work/status"
  -o APT::Architecture=amd64 -o Acquire::Languages=none
)
# As root apt downloads as the user _apt, who cannot enter our private 0700 folders.
if [ "$(id -u)" -eq 0 ]; then apt_opts+=(-o APT::Sandbox::User=root); fi

log="$work/apt.log"
apt-get "${apt_opts[@]}" update >"$log" 2>&1 ||
  { cat "$log" >&2; die "apt-get update of Debian $SUITE non-free failed (network? proxy?)"; }
(cd "$work/debs" && apt-get "${apt_opts[@]}" download \
    libnvrtc12 "libnvrtc-builtins$NVRTC_SERIES" nvidia-cuda-toolkit) >"$log" 2>&1 ||
  { cat "$log" >&2; die "downloading libnvrtc12, libnvrtc-builtins$NVRTC_SERIES, nvidia-cuda-toolkit from Debian $SUITE non-free failed (did the archive move on? update the series at the top of $0)"; }

# --- Extract only what we use. ---
deb() { local f=("$work"/debs/"$1"_*.deb); [ -f "${f[0]}" ] || die "no $1 .deb was downloaded"; echo "${f[0]}"; }
extract() { # deb, then tar members
  local file=$1; shift
  dpkg-deb --fsys-tarfile "$file" | tar -x -C "$work/x" --wildcards "$@" ||
    die "extracting $* from $(basename "$file") failed"
}
mkdir -p "$work/x" "$new/lib" "$new/bin"
libs=./usr/lib/x86_64-linux-gnu
extract "$(deb libnvrtc12)" "$libs/libnvrtc.so.12*"
extract "$(deb "libnvrtc-builtins$NVRTC_SERIES")" "$libs/libnvrtc-builtins.so.$NVRTC_SERIES*"
extract "$(deb nvidia-cuda-toolkit)" ./usr/bin/ptxas ./usr/bin/cuobjdump ./usr/bin/nvdisasm
mv "$work/x/usr/lib/x86_64-linux-gnu"/* "$new/lib/"
mv "$work/x/usr/bin"/* "$new/bin/"

# --- Verify: the versions, the soname pointing at 12.4, the tools run. ---
toolkit_version=$(dpkg-deb -f "$(deb nvidia-cuda-toolkit)" Version)
case "$toolkit_version" in
  "$TOOLKIT_SERIES".*) ;;
  *) die "nvidia-cuda-toolkit is $toolkit_version, expected $TOOLKIT_SERIES.*" ;;
esac
for pkg in libnvrtc12 "libnvrtc-builtins$NVRTC_SERIES"; do
  v=$(dpkg-deb -f "$(deb "$pkg")" Version)
  case "$v" in
    "$NVRTC_SERIES".*) ;;
    *) die "$pkg is $v, expected $NVRTC_SERIES.*" ;;
  esac
done
nvrtc_version=$(dpkg-deb -f "$(deb libnvrtc12)" Version)
builtins_version=$(dpkg-deb -f "$(deb "libnvrtc-builtins$NVRTC_SERIES")" Version)
target=$(readlink "$new/lib/libnvrtc.so.12") || die "libnvrtc.so.12 is not a symlink in libnvrtc12"
case "$target" in
  "libnvrtc.so.$NVRTC_SERIES".*) [ -f "$new/lib/$target" ] || die "libnvrtc.so.12 points at $target, which is missing" ;;
  *) die "libnvrtc.so.12 points at $target, expected libnvrtc.so.$NVRTC_SERIES.*" ;;
esac
for tool in ptxas cuobjdump nvdisasm; do
  "$new/bin/$tool" --version >/dev/null 2>&1 || die "$new/bin/$tool --version does not run"
done

# The stamp last, then one rename publishes the folder.
{
  echo "libnvrtc12 $nvrtc_version"
  echo "libnvrtc-builtins$NVRTC_SERIES $builtins_version"
  echo "nvidia-cuda-toolkit $toolkit_version"
} >"$new/VERSION"
chmod 755 "$new"
if [ -e "$DIR" ]; then # a stale folder (older pins, no stamp): out of the way first, removed on exit
  old=$(mktemp -d "$parent/.$(basename "$DIR").old.XXXXXX")
  mv -T "$DIR" "$old"
fi
mv -T "$new" "$DIR"
report
