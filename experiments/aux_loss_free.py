"""Aux-loss-free balancing (DeepSeek-V3) vs the Switch balance loss, on the tiny preset.

  top2 (lbl)     softmax top-2 router, Switch balance loss (coefficient 1e-2)
  aux_free       sigmoid router with the selection bias b <- b - gamma sign(load - mean),
                 gamma = 1e-3, and no balance loss at all
  sigmoid_lbl    the sigmoid router with the Switch loss instead of the bias: the matched
                 baseline, which isolates the bias from the change of score function

Claims checked (paired by seed): MaxVio over the last 100 steps is lower with the bias than
with the balance loss, and the validation loss is no worse (by more than 0.005), against both
baselines. Writes experiments/results/aux_loss_free.{json,png}.

    python experiments/aux_loss_free.py [--steps 600] [--seeds 0 1 2]
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402

MARGIN = 0.005
LABELS = {"top2": "softmax + LBL", "aux_free": "aux-loss-free bias", "sigmoid_lbl": "sigmoid + LBL"}


def late_vio(rs):
    return [float(np.mean(r["late"]["max_vio"])) for r in rs]


def main(argv=None):
    a = _zoo.args(argv)
    results = {n: _zoo.runs(n, a.steps, a.seeds) for n in LABELS}
    rows = []
    for n, rs in results.items():
        early = [float(_zoo.curve(r, "max_vio")[1][:50].mean()) for r in rs]
        rows.append({"name": LABELS[n], "val": _zoo.fmt_ci(_zoo.summary(_zoo.val_losses(rs))),
                     "vio_early": _zoo.fmt_ci(_zoo.summary(early), 3), "vio_late": _zoo.fmt_ci(_zoo.summary(late_vio(rs)), 3)})
    print(_zoo.table(rows, [("run", "{name}"), ("val loss", "{val}"), ("MaxVio steps 1-50", "{vio_early}"),
                            ("MaxVio last 100 steps", "{vio_late}")]))
    free = results["aux_free"]
    claims = []
    for base in ("top2", "sigmoid_lbl"):
        claims.append(_zoo.claim(f"aux-loss-free bias: lower MaxVio than {LABELS[base]}", LABELS["aux_free"],
                                 late_vio(free), LABELS[base], late_vio(results[base]), higher_is_better=False))
        claims.append(_zoo.claim(f"aux-loss-free bias: validation loss no worse than {LABELS[base]}",
                                 LABELS["aux_free"], _zoo.val_losses(free), LABELS[base],
                                 _zoo.val_losses(results[base]), higher_is_better=False, margin=MARGIN))
    _zoo.print_claims(claims)
    plt = _zoo.plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for n, rs in results.items():
        _zoo.plot_mean(ax[0], rs, "max_vio", LABELS[n])
        _zoo.plot_mean(ax[1], rs, "loss", LABELS[n])
    ax[0].set(xlabel="step", ylabel="MaxVio (mean over layers, smoothed)", title="expert-load imbalance")
    ax[1].set(xlabel="step", ylabel="train loss (smoothed)", title="loss (band: seed min-max)", ylim=(1.0, 2.5))
    for x in ax:
        x.legend()
        x.grid(alpha=0.3)
    _zoo.save("aux_loss_free", _zoo.payload("aux_loss_free", a.steps, a.seeds, claims, rows=rows), fig)


if __name__ == "__main__":
    main()
