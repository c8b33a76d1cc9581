#!/usr/bin/env bash
# Builds the out-of-tree module in DIR (a Kbuild file and its sources) against
# Debian's linux-headers-<abi>-cloud-amd64 (with its Module.symvers, so
# modversions match). Debian's linux-kbuild package of that version is not in
# the archive; the scripts/ and tools/ of lucos's prepared tree (same source)
# stand in. Extra make arguments follow DIR (e.g. KBUILD_MODPOST_WARN=1 for a
# module that uses an export the running kernel does not have yet).
# The last line printed is the path of the module, stripped of debug info.
# Cached under ${LUCOS_CACHE:-~/.cache/lucos}/modules/<version>-<key>/<name>.ko
#   usage: guest/module.sh DIR NAME [MAKE_ARG...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 2 ] || { echo "usage: $0 DIR NAME [MAKE_ARG...]" >&2; exit 2; }
src=$(cd "$1" && pwd) name=$2
shift 2
version=6.1.187-1 abi=6.1.0-53
cache=${LUCOS_CACHE:-$HOME/.cache/lucos}
tree=$(bash "$here/debian.sh" --print-dir)/build
[ -x "$tree/scripts/mod/modpost" ] || { echo "module.sh: $tree is not prepared; run 'lucos guest build'" >&2; exit 1; }
key=$( (cat "$src/"* "$0"; echo "$*") | sha256sum | cut -c1-12)
out="$cache/modules/$version-$key"
if [ -f "$out/$name.ko" ]; then echo "$out/$name.ko"; exit 0; fi
headers="$cache/modules/headers-$version"
if [ ! -f "$headers/done" ]; then
  rm -rf "$headers"; mkdir -p "$headers"
  (cd "$headers" && apt-get download "linux-headers-$abi-cloud-amd64=$version" \
      "linux-headers-$abi-common=$version" >download.log 2>&1) \
    || { cat "$headers/download.log" >&2; exit 1; }
  for d in "$headers"/*.deb; do dpkg-deb -x "$d" "$headers/root"; done
  h=$headers/root/usr/src/linux-headers-$abi-cloud-amd64
  c=$headers/root/usr/src/linux-headers-$abi-common
  echo "include $c/Makefile" >"$h/Makefile"
  for t in "$h" "$c"; do rm -f "$t/scripts" "$t/tools"; ln -s "$tree/scripts" "$t/scripts"; ln -s "$tree/tools" "$t/tools"; done
  touch "$headers/done"
fi
rm -rf "$out"; mkdir -p "$out/mod"
cp "$src/"* "$out/mod/"
make -C "$headers/root/usr/src/linux-headers-$abi-cloud-amd64" M="$out/mod" "$@" modules >"$out/build.log" 2>&1 \
  || { cat "$out/build.log" >&2; exit 1; }
strip --strip-debug "$out/mod/$name.ko" -o "$out/$name.ko"
echo "$out/$name.ko"
