"""What a triggered DAG run may change: CycleSettings overrides from an allow-list, each one bounded.

The params of a run (the trigger form, the REST API, ``dag.test``) come from whoever may trigger the DAG,
not from whoever deployed the flywheel, and become the settings of every task of the run. So a run may
tune the cycle's sizes, thresholds and choices within bounds and pick a training recipe *by name* among
the repo's (``trainer/recipes/<name>.yaml``); paths, checkpoints to resume and bind addresses stay with the
deployment's environment (``FLYWHEEL_CYCLE_*``, which this does not restrict). The evaluation servers'
``eval_serving`` flags are an allow-list of their own: a run can size them, never re-point or expose them.

:func:`cycle_settings` is the authority: every task builds its settings through it, whatever Airflow let
through. :func:`cycle_param_schema` and :func:`window_start_schema` state the same rules as JSON schema for
the DAGs' ``Param`` objects, so Airflow's trigger form shows them and refuses a bad run before it starts.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from core.settings import CycleSettings

RECIPE_DIR = Path(__file__).resolve().parents[1] / "trainer" / "recipes"
RECIPE_DIR_IN_REPO = "trainer/recipes"
_RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
RUN_PARAMS = ("cycle", "window_start")


def recipe_names() -> list[str]:
    """The recipes a run may name: the YAML files of the repo's recipe directory, by stem."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


class Knob(ABC):
    """One value a run may set: :meth:`check` returns it as CycleSettings takes it, or raises ValueError
    naming the key and what is allowed; :meth:`schema` is the same rule as JSON schema."""

    @abstractmethod
    def check(self, key: str, value: Any) -> Any: ...

    @abstractmethod
    def schema(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Number(Knob):
    kind: type[int] | type[float]
    low: float
    high: float
    nullable: bool = False  # None: the recipe's or the default's value

    def check(self, key: str, value: Any) -> Any:
        if value is None and self.nullable:
            return None
        kinds = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            kind = "an integer" if self.kind is int else "a number"
            raise ValueError(f"{key}: {value!r} is not {kind}; allowed: {self.allowed()}")
        if not self.low <= value <= self.high:
            raise ValueError(f"{key}: {value!r} is out of range; allowed: {self.allowed()}")
        return value

    def allowed(self) -> str:
        kind = "integer" if self.kind is int else "number"
        return f"{kind} in [{self.low:g}, {self.high:g}]" + (" or null" if self.nullable else "")

    def schema(self) -> dict[str, Any]:
        kind = "integer" if self.kind is int else "number"
        return {
            "type": [kind, "null"] if self.nullable else kind,
            "minimum": self.low,
            "maximum": self.high,
        }


@dataclass(frozen=True)
class Flag(Knob):
    def check(self, key: str, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: {value!r} is not a boolean; allowed: true, false")
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "boolean"}


@dataclass(frozen=True)
class Choice(Knob):
    values: tuple[str, ...]

    def check(self, key: str, value: Any) -> Any:
        if value not in self.values:
            raise ValueError(f"{key}: {value!r} is not allowed; allowed: {', '.join(self.values)}")
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "enum": list(self.values)}


@dataclass(frozen=True)
class Recipe(Knob):
    """A recipe named as the stem of a file in the repo's recipe directory; CycleSettings gets its
    repo-relative path. Never a path: no separator, no ``..``, nothing absolute."""

    def check(self, key: str, value: Any) -> Any:
        names = recipe_names()
        allowed = f"allowed: {', '.join(names)} (recipes of {RECIPE_DIR_IN_REPO}/, by name)"
        if not isinstance(value, str) or not _RECIPE_NAME.fullmatch(value):
            raise ValueError(
                f"{key}: {value!r} is not a recipe name (a run names a recipe; no path, separator, "
                f"'..' or absolute path); {allowed}"
            )
        if value not in names:
            raise ValueError(f"{key}: no recipe named {value!r}; {allowed}")
        return f"{RECIPE_DIR_IN_REPO}/{value}.yaml"

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "enum": recipe_names()}


@dataclass(frozen=True)
class Ports(Knob):
    """Two distinct unprivileged ports (the evaluation servers bind them on the serving host)."""

    low: int = 1024
    high: int = 65535

    def check(self, key: str, value: Any) -> Any:
        allowed = f"allowed: two different integers in [{self.low}, {self.high}]"
        if not isinstance(value, list | tuple) or len(value) != 2 or len(set(value)) != 2:
            raise ValueError(f"{key}: {value!r} is not two different ports; {allowed}")
        for port in value:
            if isinstance(port, bool) or not isinstance(port, int) or not self.low <= port <= self.high:
                raise ValueError(f"{key}: port {port!r} is out of range; {allowed}")
        return tuple(value)

    def schema(self) -> dict[str, Any]:
        port = {"type": "integer", "minimum": self.low, "maximum": self.high}
        return {"type": "array", "items": port, "minItems": 2, "maxItems": 2, "uniqueItems": True}


@dataclass(frozen=True)
class Table(Knob):
    """An object whose keys come from an allow-list of knobs of their own."""

    knobs: Mapping[str, Knob]

    def check(self, key: str, value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: {value!r} is not an object; allowed keys: {', '.join(self.knobs)}")
        return {k: self._knob(f"{key}.{k}", k).check(f"{key}.{k}", v) for k, v in value.items()}

    def _knob(self, key: str, name: Any) -> Knob:
        if name not in self.knobs:
            raise ValueError(f"{key}: not a key a run may set; allowed keys: {', '.join(self.knobs)}")
        return self.knobs[name]

    def schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "additionalProperties": False,
            "properties": {k: knob.schema() for k, knob in self.knobs.items()},
        }


MINUTES_30_DAYS = 30 * 24 * 60
# ServingSettings fields a run may set for its evaluation servers: sizes only (never the host, the model,
# the directories or the capture and promotion switches, which the evaluation sets itself).
EVAL_SERVING_KNOBS: dict[str, Knob] = {
    "enforce_eager": Flag(),
    "kv_cache_space_gib": Number(int, 1, 1024),
    "gpu_memory_utilization": Number(float, 0.01, 1.0),
    "max_model_len": Number(int, 16, 131_072),
}
# Every CycleSettings field, with what a run may set it to (tests/unit/test_run_params.py checks none is missing).
CYCLE_KNOBS: dict[str, Knob] = {
    "window_minutes": Number(float, 1, MINUTES_30_DAYS),
    "min_window_rows": Number(int, 0, 10_000_000),
    "eval_share": Number(float, 0, 1),
    "scratch_recipe": Recipe(),
    "refresh_recipe": Recipe(),
    "warm_start": Choice(("lineage", "champion")),
    "train_max_steps": Number(int, 1, 100_000, nullable=True),
    "eval_prompts_per_domain": Number(int, 1, 1000),
    "eval_min_rounds": Number(int, 1, 100),
    "eval_max_requests": Number(int, 1, 100_000),
    "eval_warmup_requests": Number(int, 0, 100),
    "eval_block_prompts": Number(int, 1, 1000),
    "eval_concurrency": Number(int, 1, 256),
    "eval_confidence": Number(float, 0.5, 0.999),
    "eval_max_tokens": Number(int, 1, 8192),
    "eval_ports": Ports(),
    "eval_serving": Table(EVAL_SERVING_KNOBS),
    "gate_min_speedup": Number(float, 0, 10),
    "gate_margin": Number(float, 0, 1),
    "gate_domain_tau_tolerance": Number(float, 0, 1),
    "gate_min_samples": Number(int, 1, 100_000),
    "drift_window_minutes": Number(float, 1, MINUTES_30_DAYS),
    "drift_margin": Number(float, 0, 1),
    "drift_min_steps": Number(int, 1, 10_000_000),
}
_CYCLE = Table(CYCLE_KNOBS)


def cycle_settings(params: Mapping[str, Any]) -> CycleSettings:
    """The CycleSettings of a run from its raw params: the environment's, with the run's ``cycle``
    overrides once each passed its knob. Raises ValueError naming the key and what it allows; also
    checks ``window_start`` (:func:`window_start`), so any task refuses a run with a bad one."""
    unknown = sorted(set(params) - set(RUN_PARAMS))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a param of this run; allowed: {', '.join(RUN_PARAMS)}")
    window_start(params)
    return CycleSettings(**_CYCLE.check("cycle", params.get("cycle") or {}))


def window_start(params: Mapping[str, Any]) -> datetime | None:
    """The run's ``window_start``: an ISO-8601 date-time with a UTC offset, or None (the default window)."""
    value = params.get("window_start")
    if value is None:
        return None
    example = "e.g. 2026-01-01T12:00:00+00:00"
    if not isinstance(value, str):
        raise ValueError(f"window_start: {value!r} is not an ISO-8601 date-time string ({example})")
    try:
        start = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"window_start: {value!r} is not an ISO-8601 date-time ({example})") from None
    if start.tzinfo is None:
        raise ValueError(f"window_start: {value!r} has no UTC offset ({example}, or Z)")
    return start


def cycle_param_schema() -> dict[str, Any]:
    """JSON schema of the ``cycle`` param: the knobs above, with CycleSettings' descriptions."""
    schema = _CYCLE.schema()
    for key, rule in schema["properties"].items():
        description = CycleSettings.model_fields[key].description
        if description:
            rule["description"] = description
    return schema


def window_start_schema() -> dict[str, Any]:
    return {"type": ["null", "string"], "format": "date-time"}
