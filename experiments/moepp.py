"""MoE++ zero-computation experts on the tiny preset: 8 FFN experts + 1 zero, 1 copy and
2 constant experts (the paper's 8+4 layout), with the gating residual, top-2, tau = 0.75.

Claims checked: a positive share of token-slots goes to zero-computation experts, so expert
FLOPs per token fall, with validation loss no worse than top-2 over 8 FFN experts.
Writes experiments/results/moepp.{json,png}.

    python experiments/moepp.py [--steps 600]
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
        "moepp": _zoo.run("moepp", _zoo.tiny(router="moepp", router_options=dict(
                                              num_zero_experts=1, num_copy_experts=1, num_constant_experts=2,
                                              gating_residual=True)), tc),
    }
    rows = []
    for n, r in results.items():
        ept = np.mean(r["late"]["experts_per_token"])
        rows.append({"name": n, "val": r["summary"]["val_loss"], "ept": ept, "flops": ept / 2,
                     "zc": np.mean(r["late"]["zero_compute"]),
                     "layers": " / ".join(f"{v:.2f}" for v in r["late"]["zero_compute"])})
    print(_zoo.table(rows, [("run", "{name}"), ("val loss", "{val:.4f}"), ("FFN experts/token", "{ept:.3f}"),
                            ("expert FLOPs vs top-2", "{flops:.3f}"), ("zero-computation share", "{zc:.3f}"),
                            ("share per layer", "{layers}")]))
    m, b = rows[1], rows[0]
    verdict = (f"MoE++ sends {m['zc']:.1%} of slots to zero-computation experts, expert FLOPs x{m['flops']:.3f}; "
               f"validation loss {m['val']:.4f} vs {b['val']:.4f} "
               f"({'no worse' if m['val'] <= b['val'] + 0.005 else 'WORSE'}, tolerance 0.005)")
    print(verdict)
    plt = _zoo.plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    s, v = _zoo.curve(results["moepp"], "zero_compute", layer_mean=False)
    for li in range(v.shape[1]):
        ax[0].plot(*_zoo.smoothed(s, v[:, li]), label=f"MoE layer {li}")
    ax[0].set(xlabel="step", ylabel="share of slots to zero-computation experts")
    for n, r in results.items():
        s, v = _zoo.curve(r, "loss")
        ax[1].plot(*_zoo.smoothed(s, v), label=n)
    ax[1].set(xlabel="step", ylabel="train loss (smoothed)", ylim=(1.0, 2.5))
    for x in ax:
        x.legend()
        x.grid(alpha=0.3)
    _zoo.save("moepp", {"command": f"python experiments/moepp.py --steps {a.steps}", "rows": rows, "verdict": verdict}, fig)


if __name__ == "__main__":
    main()
