# Sourced by the kernel scripts (debian.sh, kernel.sh): their shared command
# line `[--version V] [--print-dir] [--check]` and the cache root.
# Sets: version, print_dir, check, cache. $0 names the script in errors.
version=${LUCOS_KERNEL_VERSION:-6.1.187-1}
print_dir=0
check=0
while [ $# -gt 0 ]; do
  case "$1" in
    --version) version=$2; shift 2 ;;
    --print-dir) print_dir=1; shift ;;
    --check) check=1; shift ;;
    *) echo "$(basename "$0"): unknown argument '$1'" >&2; exit 2 ;;
  esac
done
cache=${LUCOS_CACHE:-$HOME/.cache/lucos}
