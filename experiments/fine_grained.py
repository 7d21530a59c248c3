"""DeepSeekMoE fine-grained experts plus a shared expert, at constant parameters and FLOPs.

From the tiny preset's 8 experts of width 256 (top-2): split every expert into m = 1, 2, 4
and make one fine-grained expert shared (`jmoe.fine_grained(cfg, m, num_shared=1)`):
  m=1: 7 routed experts (top-1) + 1 shared, width 256
  m=2: 15 routed (top-3) + 1 shared, width 128
  m=4: 31 routed (top-7) + 1 shared, width 64
Claims checked (paired by seed): validation loss falls from m = 1 to 2 and from 2 to 4.
Writes experiments/results/fine_grained.{json,png}.

    python experiments/fine_grained.py [--steps 600] [--seeds 0 1 2]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402

MS = (1, 2, 4)


def main(argv=None):
    a = _zoo.args(argv)
    results = {m: _zoo.runs(f"fine{m}", a.steps, a.seeds) for m in MS}
    rows = []
    for m, rs in results.items():
        moe = rs[0]["model"].moe
        rows.append({"m": m, "E": moe.num_experts, "k": moe.top_k, "f": moe.d_ff, "active": rs[0]["summary"]["active_params"],
                     "total": rs[0]["summary"]["total_params"], "val": _zoo.fmt_ci(_zoo.summary(_zoo.val_losses(rs))),
                     "tps": sum(r["summary"]["tokens_per_s"] for r in rs) / len(rs)})
    print(_zoo.table(rows, [("m", "{m}"), ("routed E", "{E}"), ("top-k", "{k}"), ("width", "{f}"),
                            ("active params", "{active:,}"), ("total params", "{total:,}"), ("val loss", "{val}"),
                            ("tokens/s", "{tps:,.0f}")]))
    claims = [_zoo.claim(f"fine-grained experts: m = {hi} has a lower loss than m = {lo}", f"m={hi}",
                         _zoo.val_losses(results[hi]), f"m={lo}", _zoo.val_losses(results[lo]), higher_is_better=False)
              for lo, hi in zip(MS, MS[1:])]
    _zoo.print_claims(claims)
    plt = _zoo.plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for m, rs in results.items():
        vals = _zoo.val_losses(rs)
        ax[0].plot([m] * len(vals), vals, "o", alpha=0.5, color="C0")
    ax[0].plot(MS, [_zoo.summary(_zoo.val_losses(results[m]))["mean"] for m in MS], "-", color="C0")
    ax[0].set(xlabel="segmentation m", ylabel="validation loss (dots: seeds)", xticks=list(MS))
    for m, rs in results.items():
        _zoo.plot_mean(ax[1], rs, "loss", f"m={m}")
    ax[1].set(xlabel="step", ylabel="train loss (smoothed)", ylim=(1.0, 2.5))
    for x in ax:
        x.grid(alpha=0.3)
    ax[1].legend()
    _zoo.save("fine_grained", _zoo.payload("fine_grained", a.steps, a.seeds, claims, rows=rows), fig)


if __name__ == "__main__":
    main()
