"""MoE++ zero-computation experts (zero, copy, constant) with gating residuals, on the tiny preset.

  top2     softmax top-2 over 8 FFN experts
  moepp    top-2 over 8 FFN experts + 1 zero + 1 copy + 2 constant experts, gating residual

Claims checked (paired by seed): a share of slots goes to zero-computation experts, so the
expert FLOPs per token fall below top-2's, with a validation loss no worse (by more than
0.005). Writes experiments/results/moepp.{json,png}.

    python experiments/moepp.py [--steps 600] [--seeds 0 1 2]
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402

MARGIN = 0.005


def main(argv=None):
    a = _zoo.args(argv)
    results = {n: _zoo.runs(n, a.steps, a.seeds) for n in ("top2", "moepp")}
    flops = {n: [float(np.mean(r["late"]["experts_per_token"])) / 2 for r in rs] for n, rs in results.items()}
    zc = np.asarray([r["late"]["zero_compute"] for r in results["moepp"]])  # [seeds, layers]
    rows = [{"name": n, "val": _zoo.fmt_ci(_zoo.summary(_zoo.val_losses(rs))),
             "flops": _zoo.fmt_ci(_zoo.summary(flops[n]), 3),
             "zc": _zoo.fmt_ci(_zoo.summary(zc.mean(1)), 3) if n == "moepp" else "0",
             "layers": " / ".join(f"{v:.2f}" for v in zc.mean(0)) if n == "moepp" else ""} for n, rs in results.items()]
    print(_zoo.table(rows, [("run", "{name}"), ("val loss", "{val}"), ("expert FLOPs vs top-2", "{flops}"),
                            ("zero-computation share", "{zc}"), ("share per layer (seed mean)", "{layers}")]))
    claims = [
        _zoo.claim("MoE++: fewer expert FLOPs per token than top-2", "moepp", flops["moepp"], "top2", flops["top2"],
                   higher_is_better=False),
        _zoo.claim("MoE++: validation loss no worse than top-2", "moepp", _zoo.val_losses(results["moepp"]), "top2",
                   _zoo.val_losses(results["top2"]), higher_is_better=False, margin=MARGIN),
    ]
    _zoo.print_claims(claims)
    plt = _zoo.plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    _zoo.plot_mean(ax[0], results["moepp"], "zero_compute", "moepp (layer mean)")
    ax[0].set(xlabel="step", ylabel="share of slots to zero-computation experts")
    for n, rs in results.items():
        _zoo.plot_mean(ax[1], rs, "loss", n)
    ax[1].set(xlabel="step", ylabel="train loss (smoothed; band: seed min-max)", ylim=(1.0, 2.5))
    for x in ax:
        x.legend()
        x.grid(alpha=0.3)
    _zoo.save("moepp", _zoo.payload("moepp", a.steps, a.seeds, claims, rows=rows, zero_compute_per_seed=zc.tolist()), fig)


if __name__ == "__main__":
    main()
