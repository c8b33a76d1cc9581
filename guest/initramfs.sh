#!/usr/bin/env bash
# Builds (or finds in the cache) the lucos test guest initramfs.
#
#   guest/initramfs.sh [--print-path]
#
# Contents: /init (guest/initramfs/init), /bin/busybox with a symlink per
# applet (at the paths `busybox --list-full` gives), and the static test
# programs built from guest/initramfs/src/*.c into /bin (sysloop, probe), and
# the scripts of guest/initramfs/bin (lucos-smoke).
# The archive is byte-reproducible (sorted newc cpio with fixed mtimes and
# owners, gzip -n) and cached at
#   ${LUCOS_CACHE:-~/.cache/lucos}/initramfs/<key>/initramfs.cpio.gz
# where <key> hashes guest/initramfs/**, this script and the busybox-static
# version. A second run with the same inputs is a cache hit. The last line of
# a successful run (hit or build) ends with the archive's path.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
src="$here/initramfs"
self="$here/$(basename "$0")"
print_path=0
while [ $# -gt 0 ]; do
  case "$1" in
    --print-path) print_path=1; shift ;;
    -h|--help) sed -n '2,15s/^# \{0,1\}//p' "$self"; exit 0 ;;
    *) echo "initramfs.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

die() { echo "initramfs.sh: $*" >&2; exit 1; }

# Tools, each with the Debian package that provides it.
missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$1 (apt-get install -y $2)"); }
need busybox busybox-static
need dpkg-query dpkg
need gcc gcc
need cpio cpio
need gzip gzip
need sha256sum coreutils
need find findutils
if [ ${#missing[@]} -eq 0 ]; then
  [ -e /usr/lib/x86_64-linux-gnu/libc.a ] || [ -n "$(gcc -print-file-name=libc.a | grep /)" ] \
    || missing+=("static libc (apt-get install -y libc6-dev)")
fi
[ ${#missing[@]} -eq 0 ] || die "missing: ${missing[*]}"

bbver=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null) \
  || die "busybox-static is not installed (apt-get install -y busybox-static)"
busybox=$(dpkg-query -L busybox-static 2>/dev/null | grep -E '/bin/busybox$' | head -n1)
[ -n "$busybox" ] && [ -x "$busybox" ] || busybox=$(command -v busybox)
# A dynamically linked busybox would not run in the initramfs (no libc there).
if command -v file >/dev/null 2>&1 && file -L "$busybox" | grep -q 'dynamically linked'; then
  die "$busybox is dynamically linked; install busybox-static (apt-get install -y busybox-static)"
fi

# Cache key: every file under guest/initramfs (path and content, in a fixed
# order), this script, and the busybox-static version.
key=$(
  {
    (cd "$src" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
    sha256sum < "$self"
    echo "busybox-static $bbver"
  } | sha256sum | cut -c1-12
)
cache=${LUCOS_CACHE:-$HOME/.cache/lucos}
outdir="$cache/initramfs/$key"
out="$outdir/initramfs.cpio.gz"
if [ "$print_path" = 1 ]; then echo "$out"; exit 0; fi
if [ -f "$out" ]; then echo "cache hit: $out"; exit 0; fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/lucos-initramfs.XXXXXX")
partial="$out.partial.$$"
# On any exit: drop the temp tree and a half-written archive, and the key
# directory if this run created it and left it empty.
trap 'rm -rf "$tmp"; rm -f "$partial"; rmdir "$outdir" 2>/dev/null || true' EXIT

root="$tmp/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,root,run,etc}

echo "stage: busybox $bbver"
cp "$busybox" "$root/bin/busybox"
chmod 0755 "$root/bin/busybox"
"$busybox" --list-full | while IFS= read -r applet; do
  case "$applet" in
    bin/busybox|linuxrc|*/init|init|'') continue ;;   # /init is ours
  esac
  mkdir -p "$root/$(dirname "$applet")"
  # Relative target so the link works wherever the tree is unpacked.
  rel=$(dirname "$applet" | sed -e 's#[^/][^/]*#..#g')
  ln -sf "$rel/bin/busybox" "$root/$applet"
done
[ -L "$root/bin/sh" ] || die "busybox has no sh applet"

echo "stage: programs"
for c in "$src"/src/*.c; do
  [ -e "$c" ] || continue
  name=$(basename "$c" .c)
  gcc -static -O2 -Wall -Werror -o "$root/bin/$name" "$c" || die "compiling $c failed"
  strip "$root/bin/$name" 2>/dev/null || true
done

for s in "$src"/bin/*; do
  [ -e "$s" ] || continue
  install -m 0755 "$s" "$root/bin/$(basename "$s")"
done
install -m 0755 "$src/init" "$root/init"
echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"

echo "stage: archive"
# Fixed metadata so the archive depends only on the inputs.
find "$root" -exec touch -h -d @0 {} +
chmod -R u+rwX,go+rX,go-w "$root"
mkdir -p "$outdir"
(
  cd "$root"
  find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet
) | gzip -9 -n > "$partial"
mv -f "$partial" "$out"
echo "built: $out ($(stat -c %s "$out") bytes)"
