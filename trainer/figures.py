"""Figures of a training run, logged to MLflow next to its metrics (Agg backend: no display needed)."""

from __future__ import annotations

from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves_figure(history: list[dict[str, Any]], title: str):
    """Loss and per-unroll-step draft accuracy against the training step."""
    plt = _pyplot()
    steps = [h["step"] for h in history]
    acc_keys = sorted({k for h in history for k in h if k.startswith("acc.step")})
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss_ax.plot(steps, [h.get("loss") for h in history], lw=1)
    loss_ax.set(xlabel="step", ylabel="loss", title=f"{title}: loss")
    for key in acc_keys:
        acc_ax.plot(steps, [h.get(key) for h in history], lw=1, label=key.removeprefix("acc."))
    acc_ax.set(xlabel="step", ylabel="draft = target argmax", ylim=(0, 1), title="accuracy per unroll step")
    if acc_keys:
        acc_ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def replay_tau_figure(report: Any, title: str):
    """Held-out replay τ per domain (and overall), beside the τ the served drafter recorded on them."""
    plt = _pyplot()
    rows = {name: d for name, d in sorted(report.domains.items())} | {"all": report.overall}
    names = list(rows)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(names), 3.5))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [rows[n].tau or 0 for n in names], width=0.4, label="this drafter (replay)")
    ax.bar(
        [x + 0.2 for x in xs],
        [rows[n].recorded_tau or 0 for n in names],
        width=0.4,
        label="served (recorded)",
    )
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(xs), [f"{n}\n{rows[n].traces} traces" for n in names], fontsize=8)
    ax.set(ylabel="τ (tokens per target forward)", title=f"{title}: held-out τ by domain")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
