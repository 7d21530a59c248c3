"""Global-batch vs micro-batch balance loss (Qwen's "Demons in the Detail"), on the tiny preset.

  top2 (global)   the Switch balance loss over the whole batch's expert counts
  lbl_sequence    the same loss per sequence: micro-batches of one sequence each

Claims checked (paired by seed): the global-batch loss gives a lower validation loss and more
specialised experts: mutual information between a token's first expert and the kind of its
byte (letter, digit, space, newline, punctuation, other), averaged over the MoE layers, and
counted layer by layer. Writes experiments/results/global_batch_lbl.{json,png}.

    python experiments/global_batch_lbl.py [--steps 600] [--seeds 0 1 2]
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402

LABELS = {"top2": "global batch", "lbl_sequence": "micro-batch (one sequence)"}


def main(argv=None):
    a = _zoo.args(argv)
    results = {n: _zoo.runs(n, a.steps, a.seeds) for n in LABELS}
    mi = {n: np.asarray([_zoo.specialisation(r) for r in rs]) for n, rs in results.items()}  # [seeds, layers]
    rows = [{"name": LABELS[n], "val": _zoo.fmt_ci(_zoo.summary(_zoo.val_losses(rs))),
             "mi": _zoo.fmt_ci(_zoo.summary(mi[n].mean(1)), 3),
             "layers": " / ".join(f"{v:.3f}" for v in mi[n].mean(0)),
             "vio": float(np.mean([np.mean(r["late"]["max_vio"]) for r in rs]))} for n, rs in results.items()]
    print(_zoo.table(rows, [("balance scope", "{name}"), ("val loss", "{val}"), ("MI(expert; byte kind) bits", "{mi}"),
                            ("per layer (seed mean)", "{layers}"), ("batch MaxVio", "{vio:.3f}")]))
    g, m = "top2", "lbl_sequence"
    claims = [
        _zoo.claim("global-batch balance loss: lower validation loss", LABELS[g], _zoo.val_losses(results[g]),
                   LABELS[m], _zoo.val_losses(results[m]), higher_is_better=False),
        _zoo.claim("global-batch balance loss: more specialised experts (MI, layer mean)", LABELS[g],
                   mi[g].mean(1), LABELS[m], mi[m].mean(1), higher_is_better=True),
    ]
    layers = []
    for li in range(mi[g].shape[1]):
        c = _zoo.claim(f"layer {li}: more specialised", LABELS[g], mi[g][:, li], LABELS[m], mi[m][:, li],
                       higher_is_better=True)
        layers.append({"layer": li, "difference": c["difference"], "verdict": c["verdict"]})
    more = sum(x["verdict"] == "reproduced" for x in layers)
    higher = sum(x["difference"]["mean"] > 0 for x in layers)
    print(f"specialisation higher with global counts in {higher} of {len(layers)} layers by the seed mean, "
          f"{more} of {len(layers)} by the interval")
    _zoo.print_claims(claims)
    plt = _zoo.plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.35
    for i, n in enumerate(LABELS):
        x = np.arange(mi[n].shape[1]) + i * width
        ax[0].bar(x, mi[n].mean(0), width, yerr=mi[n].std(0, ddof=1), capsize=3, label=LABELS[n])
        _zoo.plot_mean(ax[1], results[n], "loss", LABELS[n])
    ax[0].set_xticks(np.arange(mi[g].shape[1]) + width / 2, [str(i) for i in range(mi[g].shape[1])])
    ax[0].set(xlabel="MoE layer", ylabel="MI(first expert; byte kind), bits", title="expert specialisation (± sd)")
    ax[1].set(xlabel="step", ylabel="train loss (smoothed)", ylim=(1.0, 2.5))
    for x in ax:
        x.legend()
        x.grid(alpha=0.3)
    _zoo.save("global_batch_lbl", _zoo.payload("global_batch_lbl", a.steps, a.seeds, claims, rows=rows, layers=layers,
                                               mi_per_seed={LABELS[n]: v.tolist() for n, v in mi.items()},
                                               layers_higher_by_mean=higher, layers_higher_by_interval=more), fig)


if __name__ == "__main__":
    main()
