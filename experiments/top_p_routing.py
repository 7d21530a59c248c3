"""Top-p dynamic routing vs top-2 on the tiny preset.

  top2       softmax top-2 (the baseline), two seeds to measure run-to-run noise
  top_p      p = 0.4 with at most 8 experts, the paper's dynamic (entropy) loss 1e-4

Claims checked: mean experts per token below 2 and different across layers; validation loss
within noise of top-2. Writes experiments/results/top_p_routing.{json,png}.

    python experiments/top_p_routing.py [--steps 600]
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402


def main(argv=None):
    a = _zoo.args(argv)
    tc = _zoo.tiny_train(a.steps, a.seed)
    results = {
        "top2": _zoo.run("top2", _zoo.tiny(), tc),
        "top2_seed1": _zoo.run("top2", _zoo.tiny(), tc.replace(seed=a.seed + 1)),
        "top_p": _zoo.run("top_p", _zoo.tiny(router="top_p", top_k=8, router_options=dict(threshold=0.4), entropy_loss_coef=1e-4), tc),
    }
    noise = abs(results["top2"]["summary"]["val_loss"] - results["top2_seed1"]["summary"]["val_loss"])
    rows = [{"name": n, "val": r["summary"]["val_loss"], "ept": np.mean(r["late"]["experts_per_token"]),
             "layers": " / ".join(f"{v:.2f}" for v in r["late"]["experts_per_token"]),
             "tps": r["summary"]["tokens_per_s"]} for n, r in results.items()]
    print(_zoo.table(rows, [("run", "{name}"), ("val loss", "{val:.4f}"), ("experts/token", "{ept:.2f}"),
                            ("per layer", "{layers}"), ("tokens/s", "{tps:,.0f}")]))
    tp = rows[2]
    per_layer = results["top_p"]["late"]["experts_per_token"]
    gap = tp["val"] - rows[0]["val"]
    verdict = (f"top_p: {tp['ept']:.2f} experts/token ({'below' if tp['ept'] < 2 else 'NOT below'} 2), per layer "
               f"{tp['layers']} (spread {max(per_layer) - min(per_layer):.2f}); validation loss {gap:+.4f} vs top-2, "
               f"seed-to-seed noise of top-2 {noise:.4f} ({'within' if abs(gap) <= max(noise, 0.005) else 'OUTSIDE'} noise)")
    print(verdict)
    plt = _zoo.plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    s, v = _zoo.curve(results["top_p"], "experts_per_token", layer_mean=False)
    for li in range(v.shape[1]):
        ax[0].plot(*_zoo.smoothed(s, v[:, li]), label=f"MoE layer {li}")
    ax[0].axhline(2, color="k", ls="--", lw=0.8, label="top-2")
    ax[0].set(xlabel="step", ylabel="experts per token", title="top-p: experts per token by layer")
    for n in ("top2", "top_p"):
        s, v = _zoo.curve(results[n], "loss")
        ax[1].plot(*_zoo.smoothed(s, v), label=n)
    ax[1].set(xlabel="step", ylabel="train loss (smoothed)", ylim=(1.0, 2.5))
    for x in ax:
        x.legend()
        x.grid(alpha=0.3)
    _zoo.save("top_p_routing", {"command": f"python experiments/top_p_routing.py --steps {a.steps}", "rows": rows,
                                "noise": noise, "verdict": verdict}, fig)


if __name__ == "__main__":
    main()
