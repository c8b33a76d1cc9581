#!/usr/bin/env bash
# Fetches (or finds in the cache) Debian's own cloud kernel, unmodified, and
# prepares the comparison tree `lucos build` compiles objects in.
#
#   guest/debian.sh [--version V] [--print-dir] [--check]
#
# From Debian's packages of version V (default 6.1.187-1):
#   linux-image-<abi>-cloud-amd64       vmlinuz, config, System.map, modules
#   linux-image-<abi>-cloud-amd64-dbg   vmlinux with DWARF (same build id)
#   linux-source-6.1                    the source of the same version
# The source is configured with the image's own config (olddefconfig) and
# `make prepare`d; the kernel itself is never built: lucos compiles single
# objects in it on demand, and checks them against vmlinux before use.
# Layout of ${LUCOS_CACHE:-~/.cache/lucos}/kernel/debian-<V>-<key>/:
#   bzImage vmlinux System.map .config release meta.json done
#   modules/<release>/...   the image's modules tree
#   modules.cpio.gz         a few of those modules as an initramfs overlay
#                           (appended to lucos's initramfs, so tests can load them)
#   build/                  the prepared source tree
# A second run with the same version and recipe is a cache hit.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=kernel-args.sh
. "$here/kernel-args.sh"
# The key covers the version and the recipe: bump `recipe` when a change to
# this script changes what it produces.
recipe=2
key=$( { echo "$version"; echo "debian-recipe-$recipe"; } | sha256sum | cut -c1-12)
out="$cache/kernel/debian-$version-$key"
if [ "$print_dir" = 1 ]; then echo "$out"; exit 0; fi
if [ -f "$out/done" ]; then echo "cache hit: $out"; exit 0; fi
if [ "$check" = 1 ]; then echo "not fetched: $out" >&2; exit 1; fi
# Two runs at once (two test suites, two users' tools) would unpack into the
# same directory: the second waits for the first, then finds its result.
mkdir -p "$cache/kernel"
exec 9>"$cache/kernel/.debian-$version-$key.lock"
flock 9
if [ -f "$out/done" ]; then echo "cache hit: $out"; exit 0; fi

need=(make gcc flex bison bc dpkg-deb apt-get xz cpio depmod)
missing=()
for t in "${need[@]}"; do command -v "$t" >/dev/null || missing+=("$t"); done
[ -e /usr/include/libelf.h ] || missing+=(libelf-dev)
[ -e /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "debian.sh: missing tools: ${missing[*]}; run guest/deps.sh (as root) first" >&2
  exit 1
fi

# A fresh machine may have empty package lists: refresh them once.
refreshed=0
refresh() {
  [ "$refreshed" = 0 ] && [ "$(id -u)" = 0 ] || return 1
  refreshed=1
  apt-get update -qq >/dev/null 2>&1
}

# The ABI name (6.1.0-53) of the cloud image package with this version.
find_abi() {
  local p
  for p in $(apt-cache pkgnames linux-image-6.1.0- 2>/dev/null | grep -E '^linux-image-[0-9.]+-[0-9]+-cloud-amd64$' | sort -V -r); do
    if apt-cache madison "$p" 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2}' | grep -qx "$version"; then
      echo "${p#linux-image-}" | sed 's/-cloud-amd64$//'
      return 0
    fi
  done
  return 1
}
abi=$(find_abi) || { refresh && abi=$(find_abi); } || {
  echo "debian.sh: no linux-image-*-cloud-amd64 package has version $version. apt offers:" >&2
  apt-cache madison linux-source-6.1 >&2 || true
  echo "(run 'apt-get update' if the list is empty; pick one with --version)" >&2
  exit 1
}
release="$abi-cloud-amd64"

# Work in the final directory (Kbuild records absolute paths, e.g. for objtool);
# `done`, written last, is what makes it a cache hit.
work="$out"
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
cd "$work"
t0=$(date +%s.%N)
elapsed() { echo "$(date +%s.%N) $t0" | awk '{printf "%.1f", $1-$2}'; }

echo "stage: download linux-image-$release, -dbg, linux-source-6.1 ($version)"
pkgs=("linux-image-$release=$version" "linux-image-$release-dbg=$version" "linux-source-6.1=$version")
apt-get download "${pkgs[@]}" >download.log 2>&1 || { refresh && apt-get download "${pkgs[@]}" >download.log 2>&1; } || {
  cat download.log >&2
  echo "debian.sh: could not download ${pkgs[*]}" >&2
  exit 1
}
t_download=$(elapsed)

# The dbg vmlinux and the source take the longest to unpack: do them side by side.
echo "stage: unpack (image, dbg vmlinux, source)"
(
  dpkg-deb --fsys-tarfile "linux-image-${release}-dbg_"*.deb |
    tar -x --wildcards "./usr/lib/debug/boot/*"
  mv "usr/lib/debug/boot/vmlinux-$release" vmlinux
  # The image package's System.map is a placeholder that points here.
  mv "usr/lib/debug/boot/System.map-$release" System.map
) &
dbg_pid=$!
dpkg-deb -x "linux-image-${release}_"*.deb image
cp "image/boot/vmlinuz-$release" bzImage
cp "image/boot/config-$release" .config
mkdir -p modules
mv "image/lib/modules/$release" "modules/$release"
dpkg-deb --fsys-tarfile linux-source-6.1_*.deb | tar -x ./usr/src/linux-source-6.1.tar.xz
tar -xaf usr/src/linux-source-6.1.tar.xz
mv linux-source-6.1 build
wait "$dbg_pid"
rm -rf image usr ./*.deb
echo "$release" > release
t_unpack=$(elapsed)

# Modules a busybox guest can load without other modules: one overlay archive,
# which the kernel unpacks over the base initramfs it is appended to.
echo "stage: modules overlay"
overlay_modules=(fs/binfmt_misc.ko fs/isofs/isofs.ko drivers/block/loop.ko)
mkdir -p overlay/lib/modules/"$release"/kernel
for m in "${overlay_modules[@]}"; do
  [ -f "modules/$release/kernel/$m" ] || { echo "debian.sh: the image has no module $m" >&2; exit 1; }
  mkdir -p "overlay/lib/modules/$release/kernel/$(dirname "$m")"
  cp "modules/$release/kernel/$m" "overlay/lib/modules/$release/kernel/$m"
done
cp modules/"$release"/modules.builtin* overlay/lib/modules/"$release"/
# The package ships no modules.dep (its postinst runs depmod): make the overlay's own.
depmod -b overlay "$release"
(cd overlay && find . -print0 | LC_ALL=C sort -z |
   cpio --null -o -H newc --owner=0:0 --reproducible 2>/dev/null | gzip -n -9) > modules.cpio.gz
rm -rf overlay

echo "stage: configure (olddefconfig with Debian's config)"
cp .config build/.config
cd build
make -s olddefconfig >../configure.log 2>&1 || { cat ../configure.log >&2; exit 1; }
# Debian's installed config leaves out a few options (signing keys, build
# salt) that olddefconfig adds back with their defaults; an option of Debian's
# config that olddefconfig changed or dropped means the tree would not build
# what Debian built.
versions='^CONFIG_\(CC_VERSION_TEXT\|GCC_VERSION\|LD_VERSION\|AS_VERSION\|PAHOLE_VERSION\)='
comm -23 <(grep '^CONFIG_' ../.config | grep -v "$versions" | sort) \
         <(grep '^CONFIG_' .config | grep -v "$versions" | sort) >../config.changed
if [ -s ../config.changed ]; then
  echo "debian.sh: olddefconfig changed these options of Debian's config (another compiler?):" >&2
  head -20 ../config.changed >&2
  exit 1
fi
t_config=$(elapsed)
echo "stage: prepare"
make -j"$(nproc)" prepare 2>&1 | tee ../prepare.log | grep --line-buffered -E '^\s+(CC|LD|HOSTCC|HOSTLD)\b' || true
[ "${PIPESTATUS[0]}" = 0 ] || { tail -30 ../prepare.log >&2; echo "debian.sh: make prepare failed (log above)" >&2; exit 1; }
t_prepare=$(elapsed)
cd ..
printf '{"flavour":"debian","version":"%s","release":"%s","download_seconds":%s,"unpack_seconds":%s,"configure_seconds":%s,"prepare_seconds":%s}\n' \
  "$version" "$release" "$t_download" "$t_unpack" "$t_config" "$t_prepare" > meta.json
touch done
trap - EXIT
echo "fetched: $out (download ${t_download} s, unpack to ${t_unpack} s, prepare to ${t_prepare} s)"
