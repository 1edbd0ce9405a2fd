# The worker image: ingest, retention, the trainer (torchrun, NCCL on GPUs) and the Airflow tasks.
# Build from the repository root:  docker build -f deploy/docker/worker.Dockerfile -t spec-flywheel-worker .
# The locked environment (uv.lock) is installed as is: PyPI's torch wheel for Linux x86_64 carries CUDA, so
# the same image trains on CPU (gloo) or on the GPUs a pod requests (NCCL), chosen at run time.
FROM python:3.11.14-slim-bookworm

ARG UV_VERSION=0.13.9
ENV PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/opt/flywheel/venv \
    PATH=/opt/flywheel/venv/bin:$PATH \
    FLYWHEEL_STACK_STATE_DIR=/var/lib/flywheel

# git: the trainer stamps checkpoints with the code's SHA; tini reaps torchrun's workers on SIGTERM.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git tini \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir "uv==${UV_VERSION}"

WORKDIR /opt/flywheel/src
# Dependencies first (a layer that changes with the lock only), then the project.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY . .
RUN uv sync --frozen --no-dev \
    && useradd --uid 10001 --create-home flywheel \
    && mkdir -p /var/lib/flywheel \
    && chown flywheel /var/lib/flywheel

USER 10001
ENTRYPOINT ["tini", "--"]
CMD ["flywheel", "--help"]
