"""Top-p (dynamic) routing ("Harder Tasks Need More Experts") vs top-2, on the tiny preset.

  top2     softmax top-2
  top_p    each token takes experts until their probability reaches p = 0.4 (at most 8),
           with the paper's entropy loss (1e-4) that keeps the router from spreading out

Claims checked (paired by seed): fewer than 2 experts per token on average, more in the first
layer than in the last, and a validation loss no worse than top-2 (by more than 0.005).
Writes experiments/results/top_p_routing.{json,png}.

    python experiments/top_p_routing.py [--steps 600] [--seeds 0 1 2]
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402

MARGIN = 0.005


def main(argv=None):
    a = _zoo.args(argv)
    results = {n: _zoo.runs(n, a.steps, a.seeds) for n in ("top2", "top_p")}
    ept = {n: np.asarray([r["late"]["experts_per_token"] for r in rs]) for n, rs in results.items()}  # [seeds, layers]
    rows = [{"name": n, "val": _zoo.fmt_ci(_zoo.summary(_zoo.val_losses(rs))), "ept": _zoo.fmt_ci(_zoo.summary(ept[n].mean(1)), 2),
             "layers": " / ".join(f"{v:.2f}" for v in ept[n].mean(0)),
             "tps": float(np.mean([r["summary"]["tokens_per_s"] for r in rs]))} for n, rs in results.items()]
    print(_zoo.table(rows, [("run", "{name}"), ("val loss", "{val}"), ("experts/token", "{ept}"),
                            ("per layer (seed mean)", "{layers}"), ("tokens/s", "{tps:,.0f}")]))
    tp = ept["top_p"]
    claims = [
        _zoo.claim("top-p: fewer experts per token than top-2", "top_p", tp.mean(1), "top2", ept["top2"].mean(1),
                   higher_is_better=False),
        _zoo.claim("top-p: more experts per token in the first MoE layer than in the last", "first layer", tp[:, 0],
                   "last layer", tp[:, -1], higher_is_better=True),
        _zoo.claim("top-p: validation loss no worse than top-2", "top_p", _zoo.val_losses(results["top_p"]), "top2",
                   _zoo.val_losses(results["top2"]), higher_is_better=False, margin=MARGIN),
    ]
    _zoo.print_claims(claims)
    plt = _zoo.plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    per_layer = [_zoo.curve(r, "experts_per_token", layer_mean=False) for r in results["top_p"]]  # per seed
    for li in range(tp.shape[1]):
        curves = [_zoo.smoothed(steps, v[:, li]) for steps, v in per_layer]
        n = min(len(c[1]) for c in curves)
        ax[0].plot(curves[0][0][:n], np.mean([c[1][:n] for c in curves], 0), label=f"MoE layer {li}")
    ax[0].axhline(2, color="k", ls="--", lw=0.8, label="top-2")
    ax[0].set(xlabel="step", ylabel="experts per token (seed mean)", title="top-p: experts per token by layer")
    for n, rs in results.items():
        _zoo.plot_mean(ax[1], rs, "loss", n)
    ax[1].set(xlabel="step", ylabel="train loss (smoothed; band: seed min-max)", ylim=(1.0, 2.5))
    for x in ax:
        x.legend()
        x.grid(alpha=0.3)
    _zoo.save("top_p_routing", _zoo.payload("top_p_routing", a.steps, a.seeds, claims, rows=rows,
                                            experts_per_token_per_seed=tp.tolist()), fig)


if __name__ == "__main__":
    main()
