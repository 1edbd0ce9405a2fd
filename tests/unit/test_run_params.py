"""A triggered run's params pass an allow-list before they become settings (core/run_params.py): known
keys only, numbers within bounds, recipes by name from the repo; the JSON schema the DAGs' trigger form
enforces states the same rules."""

from __future__ import annotations

from datetime import UTC, datetime

import jsonschema
import pytest

from core.run_params import (
    CYCLE_KNOBS,
    EVAL_SERVING_KNOBS,
    cycle_param_schema,
    cycle_settings,
    recipe_names,
    window_start,
)
from core.settings import CycleSettings, ServingSettings

VALID = {
    "window_minutes": 1440,
    "min_window_rows": 20,
    "train_max_steps": 3,
    "eval_confidence": 0.9,
    "eval_ports": [8041, 8042],
    "eval_serving": {"enforce_eager": True, "kv_cache_space_gib": 1},
    "warm_start": "champion",
    "scratch_recipe": "scratch",
    "refresh_recipe": "objective_kl",
}


def test_valid_params_become_the_run_settings():
    cycle = cycle_settings({"cycle": VALID, "window_start": "2026-01-01T12:00:00+00:00"})
    assert cycle.window_minutes == 1440 and cycle.train_max_steps == 3 and cycle.eval_ports == (8041, 8042)
    assert cycle.eval_serving == {"enforce_eager": True, "kv_cache_space_gib": 1}
    assert cycle.scratch_recipe == "trainer/recipes/scratch.yaml"
    assert cycle.refresh_recipe == "trainer/recipes/objective_kl.yaml"
    assert cycle_settings({}) == cycle_settings({"cycle": None}) == CycleSettings()
    jsonschema.validate(VALID, cycle_param_schema())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scratch_recipe": "/etc/passwd"}, r"cycle\.scratch_recipe: '/etc/passwd' is not a recipe name"),
        ({"scratch_recipe": "../x"}, r"cycle\.scratch_recipe: '\.\./x' is not a recipe name.*no path"),
        ({"refresh_recipe": "trainer/recipes/scratch.yaml"}, r"cycle\.refresh_recipe: .* no path"),
        ({"refresh_recipe": "..\\x"}, r"cycle\.refresh_recipe: .* not a recipe name"),
        ({"scratch_recipe": "nope"}, r"cycle\.scratch_recipe: no recipe named 'nope'; allowed: .*scratch"),
        ({"resume": "/tmp/evil.pt"}, r"cycle\.resume: not a key a run may set; allowed keys: window_minutes"),
        (
            {"eval_confidence": 1.5},
            r"cycle\.eval_confidence: 1\.5 is out of range; allowed: number in \[0\.5, 0\.999\]",
        ),
        ({"train_max_steps": 0}, r"cycle\.train_max_steps: 0 is out of range; .*\[1, 100000\] or null"),
        ({"train_max_steps": 10**9}, r"cycle\.train_max_steps: .* out of range"),
        ({"min_window_rows": 2.5}, r"cycle\.min_window_rows: 2\.5 is not an integer"),
        ({"eval_share": True}, r"cycle\.eval_share: True is not a number"),
        ({"warm_start": "latest"}, r"cycle\.warm_start: 'latest' is not allowed; allowed: lineage, champion"),
        ({"eval_ports": [80, 8042]}, r"cycle\.eval_ports: port 80 is out of range"),
        ({"eval_ports": [8041, 8041]}, r"cycle\.eval_ports: .* not two different ports"),
        ({"eval_serving": {"host": "0.0.0.0"}}, r"cycle\.eval_serving\.host: not a key a run may set"),
        ({"eval_serving": {"models_dir": "/"}}, r"cycle\.eval_serving\.models_dir: not a key"),
        ({"eval_serving": {"gpu_memory_utilization": 2}}, r"eval_serving\.gpu_memory_utilization: 2 is out"),
    ],
)
def test_a_run_outside_the_allow_list_is_refused_with_the_key_and_what_is_allowed(overrides, message):
    with pytest.raises(ValueError, match=message):
        cycle_settings({"cycle": overrides})
    with pytest.raises(jsonschema.ValidationError):  # the trigger form refuses it too
        jsonschema.validate(overrides, cycle_param_schema())


def test_the_check_is_the_authority_where_the_schema_says_nothing():
    """NaN is no JSON (the schema's bounds do not catch it) but a Python caller can pass it."""
    with pytest.raises(ValueError, match=r"cycle\.gate_margin: nan is out of range"):
        cycle_settings({"cycle": {"gate_margin": float("nan")}})


def test_unknown_run_params_and_a_cycle_that_is_no_object_are_refused():
    with pytest.raises(ValueError, match="recipe: not a param of this run; allowed: cycle, window_start"):
        cycle_settings({"cycle": {}, "recipe": "/tmp/x.yaml"})
    with pytest.raises(ValueError, match="cycle: 'scratch' is not an object"):
        cycle_settings({"cycle": "scratch"})


def test_window_start_is_an_iso_date_time_with_an_offset():
    assert window_start({}) is None and window_start({"window_start": None}) is None
    start = datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert window_start({"window_start": "2026-01-01T12:00:00+00:00"}) == start
    assert window_start({"window_start": "2026-01-01T12:00:00Z"}) == start
    for bad, message in [
        ("yesterday", "not an ISO-8601 date-time"),
        ("2026-01-01T12:00:00", "has no UTC offset"),
        (1767268800, "not an ISO-8601 date-time string"),
    ]:
        with pytest.raises(ValueError, match=f"window_start: .*{message}"):
            window_start({"window_start": bad})
        with pytest.raises(ValueError, match="window_start"):  # every task's settings check it
            cycle_settings({"window_start": bad})


def test_every_cycle_setting_is_placed_and_its_default_allowed():
    """A new CycleSettings field must be given its bounds here before a run can set it."""
    assert set(CYCLE_KNOBS) == set(CycleSettings.model_fields)
    assert set(EVAL_SERVING_KNOBS) <= set(ServingSettings.model_fields)
    defaults = CycleSettings().model_dump()
    for key in ("scratch_recipe", "refresh_recipe"):
        name = defaults[key].removeprefix("trainer/recipes/").removesuffix(".yaml")
        assert name in recipe_names()
        defaults[key] = name
    defaults["eval_ports"] = list(defaults["eval_ports"])
    assert cycle_settings({"cycle": defaults}) == CycleSettings()
    schema = cycle_param_schema()
    jsonschema.validate(defaults, schema)
    assert schema["additionalProperties"] is False and schema["properties"]["window_minutes"]["description"]


def test_the_demo_runs_pass():
    from flywheel.demo.plan import FULL, QUICK

    for plan in (QUICK, FULL):
        cycle_settings({"cycle": plan.cycle_conf(1), "window_start": datetime.now(UTC).isoformat()})


def test_a_cycle_never_resumes_from_a_recipes_checkpoint(tmp_path):
    from flywheel.cycle import cycle_recipe

    assert cycle_recipe(CycleSettings(), warm=False).name == "scratch"
    assert cycle_recipe(CycleSettings(), warm=True).name == "champion-refresh"
    recipe = tmp_path / "resumes.yaml"
    recipe.write_text("name: resumes\nresume: /tmp/elsewhere/step_000100.pt\n")
    with pytest.raises(
        ValueError, match="resumes.yaml sets resume=/tmp/elsewhere/step_000100.pt: a flywheel"
    ):
        cycle_recipe(CycleSettings(scratch_recipe=str(recipe)), warm=False)
