#!/usr/bin/env bash
# Installs libportmux (shared and static), portmux.h and portmux.pc.
#   proto/ffi/install.sh [--prefix DIR] [--from TARGET_DIR]
# --prefix: where to install (default /usr/local). --from: take an already
# built library from TARGET_DIR (e.g. target/debug) instead of building release.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
prefix=/usr/local
from=
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    --from) from="$2"; shift 2 ;;
    *) echo "install.sh: unknown argument $1 (use --prefix DIR, --from TARGET_DIR)" >&2; exit 2 ;;
  esac
done
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/../../Cargo.toml" | head -1)"
major="${version%%.*}"
if [ -z "$from" ]; then
  (cd "$here/../.." && cargo build --release -p portmux-ffi)
  from="$here/../../target/release"
fi
for f in libportmux.so libportmux.a; do
  [ -f "$from/$f" ] || { echo "install.sh: $from/$f is missing; build it with cargo build -p portmux-ffi" >&2; exit 1; }
done
install -d "$prefix/lib/pkgconfig" "$prefix/include"
install -m 0755 "$from/libportmux.so" "$prefix/lib/libportmux.so.$version"
ln -sf "libportmux.so.$version" "$prefix/lib/libportmux.so.$major"
ln -sf "libportmux.so.$major" "$prefix/lib/libportmux.so"
install -m 0644 "$from/libportmux.a" "$prefix/lib/libportmux.a"
install -m 0644 "$here/include/portmux.h" "$prefix/include/portmux.h"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "$here/portmux.pc.in" > "$prefix/lib/pkgconfig/portmux.pc"
# The dynamic linker's cache knows the new library in the system's own dirs;
# elsewhere programs need -Wl,-rpath or LD_LIBRARY_PATH.
case "$prefix" in
  /usr|/usr/local) [ "$(id -u)" = 0 ] && command -v ldconfig >/dev/null && { ldconfig || true; } ;;
  *) echo "note: $prefix/lib is not searched by default: link with -Wl,-rpath,$prefix/lib or set LD_LIBRARY_PATH" ;;
esac
echo "installed libportmux $version in $prefix"
