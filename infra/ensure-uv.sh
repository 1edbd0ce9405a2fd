#!/usr/bin/env bash
# Print the path of a usable `uv`, installing the pinned version from PyPI into .tools/ if none is on PATH.
set -euo pipefail
UV_VERSION=0.13.9
if command -v uv >/dev/null 2>&1; then command -v uv; exit 0; fi
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -x "$root/.tools/bin/uv" ]; then
  python3 -m venv "$root/.tools" >&2
  "$root/.tools/bin/pip" install --quiet "uv==${UV_VERSION}" >&2
fi
echo "$root/.tools/bin/uv"
