#!/usr/bin/env bash
# What `make bench` and `make load` need beyond the build, installed only when
# missing: libvips (Debian's libvips42 and libvips-tools, the yardstick) and
# pyvips (PyPI) to drive it from scripts/vips_bench.py.
set -euo pipefail
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else echo "error: need root (or sudo) to run: $*" >&2; exit 1
  fi
}
if ! command -v vips >/dev/null 2>&1; then
  echo "==> installing libvips (Debian packages libvips42, libvips-tools)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libvips42 libvips-tools
fi
if ! python3 -c 'import pyvips' >/dev/null 2>&1; then
  echo "==> installing pyvips (PyPI)"
  python3 -m pip install -q pyvips==2.2.3 2>/dev/null \
    || python3 -m pip install -q --break-system-packages pyvips==2.2.3
fi
