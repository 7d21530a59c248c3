"""MoE vs dense at equal active parameters and equal steps, on the embedded corpus.

Trains the `tiny` preset with its MoE FFNs (E=8, k=2, expert width 256) and with dense FFNs
of width 512 = k * 256, so both models run the same FFN FLOPs per token, with the same seeds,
batches and schedule. Claim checked: the MoE model's validation loss is lower. Writes
experiments/results/moe_vs_dense.{json,png}.

    python experiments/moe_vs_dense.py                 # 600 steps, seeds 0 1 2
    python experiments/moe_vs_dense.py --steps 200 --seeds 0 1
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402


def main(argv=None):
    a = _zoo.args(argv)
    results = {n: _zoo.runs(n, a.steps, a.seeds) for n in ("top2", "dense")}
    rows = [{"name": "MoE" if n == "top2" else n, "active": rs[0]["summary"]["active_params"],
             "total": rs[0]["summary"]["total_params"], "val": _zoo.fmt_ci(_zoo.summary(_zoo.val_losses(rs))),
             "tps": sum(r["summary"]["tokens_per_s"] for r in rs) / len(rs)} for n, rs in results.items()]
    print(_zoo.table(rows, [("model", "{name}"), ("active params", "{active:,}"), ("total params", "{total:,}"),
                            ("val loss (mean ± sd)", "{val}"), ("tokens/s", "{tps:,.0f}")]))
    claims = [_zoo.claim("MoE beats a dense FFN at equal active parameters (validation loss)", "MoE",
                         _zoo.val_losses(results["top2"]), "dense", _zoo.val_losses(results["dense"]),
                         higher_is_better=False)]
    _zoo.print_claims(claims)
    plt = _zoo.plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for n, rs in results.items():
        _zoo.plot_mean(ax, rs, "loss", "MoE (E=8, k=2)" if n == "top2" else "dense")
    ax.set(xlabel="step", ylabel="train loss (smoothed; band: seed min-max)", ylim=(1.0, 2.5),
           title="tiny preset: MoE vs dense at equal active parameters")
    ax.grid(alpha=0.3)
    ax.legend()
    _zoo.save("moe_vs_dense", _zoo.payload("moe_vs_dense", a.steps, a.seeds, claims, rows=rows), fig)


if __name__ == "__main__":
    main()
