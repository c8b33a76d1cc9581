#!/usr/bin/env bash
# Builds the livepatch twin of sample bundle `cmdline` (guest/livepatch/, the
# kernel's samples/livepatch pattern: a hand-written replacement of
# cmdline_proc_show, not generated from the diff) against Debian's
# linux-headers-<abi>-cloud-amd64 (with its Module.symvers, so modversions
# match). Debian's linux-kbuild package of that version is not in the archive;
# the scripts/ and tools/ of lucos's prepared tree (same source) stand in.
# The last line printed is the path of the module. Cached under
#   ${LUCOS_CACHE:-~/.cache/lucos}/livepatch/<version>-<key>/livepatch-cmdline.ko
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=6.1.187-1 abi=6.1.0-53
cache=${LUCOS_CACHE:-$HOME/.cache/lucos}
tree=$(bash "$here/debian.sh" --print-dir)/build
[ -x "$tree/scripts/mod/modpost" ] || { echo "livepatch.sh: $tree is not prepared; run 'lucos guest build'" >&2; exit 1; }
key=$(cat "$here/livepatch/"* "$0" | sha256sum | cut -c1-12)
out="$cache/livepatch/$version-$key"
if [ -f "$out/livepatch-cmdline.ko" ]; then echo "$out/livepatch-cmdline.ko"; exit 0; fi
rm -rf "$out"; mkdir -p "$out/deb" "$out/mod"
cd "$out/deb"
apt-get download "linux-headers-$abi-cloud-amd64=$version" "linux-headers-$abi-common=$version" >download.log 2>&1 \
  || { cat download.log >&2; exit 1; }
for d in ./*.deb; do dpkg-deb -x "$d" root; done
h=$out/deb/root/usr/src/linux-headers-$abi-cloud-amd64
c=$out/deb/root/usr/src/linux-headers-$abi-common
echo "include $c/Makefile" >"$h/Makefile"
for t in "$h" "$c"; do rm -f "$t/scripts" "$t/tools"; ln -s "$tree/scripts" "$t/scripts"; ln -s "$tree/tools" "$t/tools"; done
cp "$here/livepatch/"* "$out/mod/"
make -C "$h" M="$out/mod" modules >"$out/build.log" 2>&1 || { cat "$out/build.log" >&2; exit 1; }
strip --strip-debug "$out/mod/livepatch-cmdline.ko" -o "$out/livepatch-cmdline.ko"
echo "$out/livepatch-cmdline.ko"
