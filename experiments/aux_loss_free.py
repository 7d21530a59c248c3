"""Aux-loss-free balancing (DeepSeek-V3) vs the Switch balance loss, on the tiny preset.

  lbl            softmax top-2 router, Switch balance loss (coefficient 1e-2)
  aux_free       sigmoid router with the selection bias b <- b - gamma sign(load - mean),
                 gamma = 1e-3, and no balance loss at all
  sigmoid_lbl    the sigmoid router with the Switch loss instead of the bias (isolates the
                 effect of the bias from the change of score function)

Claim checked: MaxVio falls over training to at most the LBL run's level, with validation
loss no worse. Prints the table and writes experiments/results/aux_loss_free.{json,png}.

    python experiments/aux_loss_free.py [--steps 600]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402


def main(argv=None):
    a = _zoo.args(argv)
    tc = _zoo.tiny_train(a.steps, a.seed)
    variants = {
        "lbl": _zoo.tiny(),
        "aux_free": _zoo.tiny(router="sigmoid_bias", balance_loss="none", router_options=dict(bias_update_rate=1e-3)),
        "sigmoid_lbl": _zoo.tiny(router="sigmoid_bias", router_options=dict(bias_update_rate=0.0)),
    }
    results = {n: _zoo.run(n, m, tc) for n, m in variants.items()}
    rows = []
    for n, r in results.items():
        steps, vio = _zoo.curve(r, "max_vio")
        rows.append({"name": n, "val": r["summary"]["val_loss"], "vio_early": vio[:50].mean(), "vio_late": vio[-100:].mean()})
    print(_zoo.table(rows, [("run", "{name}"), ("val loss", "{val:.4f}"), ("MaxVio steps 1-50", "{vio_early:.3f}"),
                            ("MaxVio last 100 steps", "{vio_late:.3f}")]))
    lbl, free = rows[0], rows[1]
    verdict = (f"aux-loss-free MaxVio (last 100 steps) {free['vio_late']:.3f} vs LBL {lbl['vio_late']:.3f}: "
               f"{'at most' if free['vio_late'] <= lbl['vio_late'] else 'ABOVE'} the LBL level; validation loss "
               f"{free['val']:.4f} vs {lbl['val']:.4f} ({'no worse' if free['val'] <= lbl['val'] + 0.005 else 'WORSE'}, "
               f"tolerance 0.005)")
    print(verdict)
    plt = _zoo.plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for n, r in results.items():
        s, v = _zoo.curve(r, "max_vio")
        ax[0].plot(*_zoo.smoothed(s, v), label=n)
        s, v = _zoo.curve(r, "loss")
        ax[1].plot(*_zoo.smoothed(s, v), label=n)
    ax[0].set(xlabel="step", ylabel="MaxVio (mean over layers, smoothed)", title="expert-load imbalance")
    ax[1].set(xlabel="step", ylabel="train loss (smoothed)", title="loss", ylim=(1.0, 2.5))
    for x in ax:
        x.legend()
        x.grid(alpha=0.3)
    _zoo.save("aux_loss_free", {"command": f"python experiments/aux_loss_free.py --steps {a.steps}", "rows": rows,
                                "verdict": verdict}, fig)


if __name__ == "__main__":
    main()
