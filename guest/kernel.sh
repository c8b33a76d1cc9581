#!/usr/bin/env bash
# Builds (or finds in the cache) the lucos test guest kernel.
#
#   guest/kernel.sh [--version V] [--print-dir] [--check]
#
# The kernel comes from Debian's linux-source-6.1 package, is configured from
# tinyconfig + kvm_guest.config + guest/config/lucos.config, and is built with
# no extra compiler flags. The result, including the whole build tree (later
# steps diff objects against it), is cached under
#   ${LUCOS_CACHE:-~/.cache/lucos}/kernel/<version>-<config hash>/
# A second run with the same version and config is a cache hit.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=kernel-args.sh
. "$here/kernel-args.sh"
# The key covers everything that decides the output: version, fragment, recipe.
key=$( { echo "$version"; cat "$here/config/lucos.config"; echo recipe-1; } | sha256sum | cut -c1-12)
out="$cache/kernel/$version-$key"
if [ "$print_dir" = 1 ]; then echo "$out"; exit 0; fi
if [ -f "$out/done" ]; then echo "cache hit: $out"; exit 0; fi
if [ "$check" = 1 ]; then echo "not built: $out" >&2; exit 1; fi

need=(make gcc flex bison bc pahole cpio xz)
missing=()
for t in "${need[@]}"; do command -v "$t" >/dev/null || missing+=("$t"); done
[ -e /usr/include/libelf.h ] || missing+=(libelf-dev)
[ -e /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "kernel.sh: missing build tools: ${missing[*]}; run guest/deps.sh (as root) first" >&2
  exit 1
fi

work="$out.partial"
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
cd "$work"
echo "stage: download linux-source-6.1=$version"
# A fresh machine may have empty package lists: refresh them once and retry.
if ! apt-get download "linux-source-6.1=$version" >download.log 2>&1 &&
   ! { [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 &&
       apt-get download "linux-source-6.1=$version" >download.log 2>&1; }; then
  echo "kernel.sh: linux-source-6.1=$version is not available. apt offers:" >&2
  apt-cache madison linux-source-6.1 >&2 || true
  echo "(run 'apt-get update' if the list is empty; pick one with --version)" >&2
  exit 1
fi
echo "stage: unpack"
dpkg-deb -x linux-source-6.1_*.deb pkg
tar -xaf pkg/usr/src/linux-source-6.1.tar.xz
rm -rf pkg linux-source-6.1_*.deb
mv linux-source-6.1 build
cd build
echo "stage: configure"
make -s tinyconfig >/dev/null
make -s kvm_guest.config >/dev/null
scripts/kconfig/merge_config.sh -m .config "$here/config/lucos.config" >/dev/null
make -s olddefconfig >/dev/null
# Verify every requested option survived olddefconfig: a silent drop would
# give a guest that boots but cannot be patched.
bad=0
while IFS= read -r line; do
  case "$line" in CONFIG_*=*) grep -qx "$line" .config || { echo "kernel.sh: config dropped: $line" >&2; bad=1; } ;; esac
done < "$here/config/lucos.config"
[ "$bad" = 0 ] || exit 1
echo "stage: build"
start=$(date +%s)
set +e
make -j"$(nproc)" bzImage 2>&1 | tee ../build.log | grep --line-buffered -E '^\s+(CC|LD|AR|AS)\b'
st=${PIPESTATUS[0]}
set -e
[ "$st" = 0 ] || { tail -30 ../build.log >&2; echo "kernel.sh: build failed (log above)" >&2; exit 1; }
end=$(date +%s)
cd ..
cp build/vmlinux build/System.map build/.config .
cp build/arch/x86/boot/bzImage .
echo "{\"version\":\"$version\",\"config_hash\":\"$key\",\"build_seconds\":$((end-start))}" > meta.json
touch done
cd /
trap - EXIT
rm -rf "$out"
mv "$work" "$out"
echo "built: $out ($((end-start)) s)"
