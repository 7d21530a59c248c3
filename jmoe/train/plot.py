"""The run's picture: loss curves and a per-layer expert-load heatmap over training."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def plot_run(records: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Write a PNG (atomically) from metrics records; returns the path, or None without data."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        return None
    # a standalone Figure: no pyplot state, no global backend switch (notebooks keep theirs)
    from matplotlib.figure import Figure

    loads = [r["load"] for r in train if r.get("load")]
    n_moe = len(loads[0]) if loads else 0
    fig_rows = 1 + n_moe
    fig = Figure()
    fig.set_size_inches(9, 3.2 + 1.6 * n_moe)
    axes = fig.subplots(
        fig_rows, 1, squeeze=False,
        gridspec_kw={"height_ratios": [2.2] + [1] * n_moe},
    )
    ax = axes[0, 0]
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["loss"] for r in train], lw=0.8, alpha=0.8, label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "training")
    if n_moe:
        load_steps = [r["step"] for r in train if r.get("load")]
        arr = np.asarray(loads, np.float32)  # [time, layers, E]
        E = arr.shape[-1]
        for li in range(n_moe):
            a = axes[1 + li, 0]
            im = a.imshow(
                arr[:, li, :].T * E, aspect="auto", origin="lower", cmap="viridis",
                extent=[load_steps[0], load_steps[-1] + 1, -0.5, E - 0.5], vmin=0, vmax=max(2.0, float(arr.max() * E)),
            )
            a.set_ylabel(f"MoE layer {li}\nexpert")
            fig.colorbar(im, ax=a, label="load x E")
        axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path
