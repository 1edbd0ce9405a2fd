"""Checkpoints hold tensors and plain data only: what the trainer writes reads back with
``torch.load(weights_only=True)``, and a file carrying any other pickled object is refused unrun."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eagle3_drafter import TINY

from trainer.eagle3_drafter import Eagle3Config, Eagle3Drafter
from trainer.recipes import TrainRecipeConfig
from trainer.train_loop import DrafterTrainingRecipe, load_checkpoint, plain


class _Reader:
    """A window reader's provenance, with the non-plain values a lake library may hand back."""

    def provenance(self) -> dict:
        return {
            "uri": Path("/lake/traces"),
            "table_version": np.int64(2),
            "trace_bytes": np.int64(1234),
            "heldout_fraction": np.float64(0.1),
            "start": datetime(2026, 1, 1, tzinfo=UTC),
        }


def _recipe(tmp_path: Path) -> DrafterTrainingRecipe:
    recipe = DrafterTrainingRecipe(TrainRecipeConfig(name="ckpt", output_dir=tmp_path), argv=["pytest"])
    recipe.rank, recipe.world, recipe.out_dir = 0, 1, tmp_path
    recipe.reader, recipe.cutoff = _Reader(), datetime(2026, 1, 2, tzinfo=UTC)
    recipe.drafter = Eagle3Drafter(Eagle3Config(**TINY))
    recipe.optimizer = torch.optim.AdamW(recipe.drafter.parameters(), lr=1e-3)
    return recipe


class _WritesAFile:
    """Unpickling calls ``open(marker, "w")``: the file exists afterwards only if the payload ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_checkpoint_round_trips_with_weights_only(tmp_path):
    recipe = _recipe(tmp_path)
    sum(p.sum() for p in recipe.drafter.parameters()).backward()
    recipe.optimizer.step()  # optimizer state with tensors in it
    recipe.step, recipe.replica_digests = 7, ["abc"]
    path = recipe.save_checkpoint()

    state = load_checkpoint(path)
    assert state["step"] == 7 and state["replica_digests"] == ["abc"] and state["optimizer"]["state"]
    assert state["model_config"]["aux_layer_ids"] == (2, 15, 27)
    assert state["window"]["uri"] == "/lake/traces" and type(state["window"]["table_version"]) is int
    assert state["window"]["start"] == "2026-01-01T00:00:00+00:00"
    assert state["recipe"]["name"] == "ckpt" and state["argv"] == ["pytest"]

    resumed = _recipe(tmp_path)
    resumed._load_checkpoint(path)
    assert resumed.step == 7
    for name, t in recipe.drafter.state_dict().items():
        assert torch.equal(resumed.drafter.state_dict()[name], t)


def test_a_checkpoint_with_a_pickled_object_is_refused_unrun(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "step_000001.pt"
    torch.save({"model": {}, "step": 1, "window": _WritesAFile(marker)}, path)

    with pytest.raises(pickle.UnpicklingError, match=r"refused, nothing in it ran .*io\.open"):
        load_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):
        _recipe(tmp_path)._load_checkpoint(path)
    assert not marker.exists()

    torch.load(path, weights_only=False)  # the payload is live: the unsafe load does run it
    assert marker.exists()


def test_plain_converts_what_it_can_and_names_what_it_cannot():
    class Mode(Enum):
        A = "a"

    assert plain({"p": Path("x"), "m": Mode.A, "a": np.arange(2), "t": (np.float32(0.5),)}) == {
        "p": "x",
        "m": "a",
        "a": [0, 1],
        "t": (0.5,),
    }
    with pytest.raises(TypeError, match=r"checkpoint\.window\.reader: object"):
        plain({"window": {"reader": object()}})
