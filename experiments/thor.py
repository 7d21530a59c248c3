"""THOR (stochastic experts) on the tiny preset: one random expert per layer and forward pass,
trained with the consistency regulariser, against Switch-style learned top-1 routing.

Three variants of the tiny MoE (8 experts per layer, one active), same batches per seed:
  switch     a learned softmax router, top-1, with the Switch balance loss
  thor       no router: one expert drawn per layer and forward pass, two passes per step,
             CE_1 + CE_2 + 5 x their symmetric KL (the reference's example: --consistency-alpha 5)
  thor_nocr  the same random experts, one pass, no regulariser
Validation runs every variant deterministically; THOR with one expert (expert 0), which the
regulariser trains to agree with the others. Claims, paired by seed (validation loss): THOR
beats learned top-1 routing (the paper's claim over Switch); the regulariser helps (thor beats
thor_nocr). THOR's steps run two forward passes. At inference THOR can also take the ensemble
of its experts (each layer the mean of every expert, `inference="ensemble"`, 8 times the
expert compute): its validation loss against one expert's, for both THOR variants (claims:
the ensemble beats one expert, for thor and for thor_nocr, whose experts the regulariser has
not pulled together). Writes experiments/results/thor.{json,png}.

    python experiments/thor.py [--steps 600] [--seeds 0 1 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402

from jmoe.data import eval_batches  # noqa: E402
from jmoe.train import rundir  # noqa: E402
from jmoe.train.trainer import evaluate  # noqa: E402

from _harness import cached  # noqa: E402

ALPHA = 5.0
VARIANTS = {  # name: (MoE changes, consistency weight)
    "switch": ({"top_k": 1}, 0.0),
    "thor": ({"router": "thor", "top_k": 1}, ALPHA),
    "thor_nocr": ({"router": "thor", "top_k": 1}, 0.0),
}


def ensemble_loss(result: dict) -> float:
    """Validation loss of a THOR run with the ensemble of every expert at inference."""
    cfg, tc, params, state, _, _ = rundir.load_run(result["dir"])
    cfg = cfg.with_moe(router_options={**cfg.moe.router_options.to_dict(), "inference": "ensemble"})
    val = eval_batches(_zoo.corpus(None).val, tc.eval_batches, tc.batch_size, tc.seq_len)
    return evaluate(params, state or None, cfg, val)["val_loss"]


def main(argv=None):
    a = _zoo.args(argv)
    results = {name: [_zoo.run(name, _zoo.tiny(**moe), _zoo.tiny_train(a.steps, s, consistency_weight=w))
                      for s in a.seeds] for name, (moe, w) in VARIANTS.items()}
    val = {name: _zoo.val_losses(rs) for name, rs in results.items()}
    claims = [
        _zoo.claim("THOR beats learned top-1 routing (validation loss)", "thor", val["thor"], "switch",
                   val["switch"], higher_is_better=False),
        _zoo.claim("the consistency regulariser helps THOR (validation loss)", "thor", val["thor"], "thor_nocr",
                   val["thor_nocr"], higher_is_better=False),
    ]
    ensemble = {name: [cached(_zoo.RUNS, "thor_ensemble", {"run": r["dir"]}, lambda r=r: ensemble_loss(r))
                       for r in results[name]] for name in ("thor", "thor_nocr")}
    claims.append(_zoo.claim("THOR's expert ensemble beats one expert at inference (validation loss)", "thor_ensemble",
                             ensemble["thor"], "thor", val["thor"], higher_is_better=False))
    claims.append(_zoo.claim("without the regulariser, the expert ensemble beats one expert (validation loss)",
                             "thor_nocr_ensemble", ensemble["thor_nocr"], "thor_nocr", val["thor_nocr"],
                             higher_is_better=False))
    _zoo.print_claims(claims)
    for name, losses in ensemble.items():
        print(f"{name}: one expert {np.mean(val[name]):.4f}, the ensemble of every expert {np.mean(losses):.4f}")
    plt = _zoo.plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    names = list(VARIANTS)
    ax.bar(names, [np.mean(val[n]) for n in names], yerr=[np.std(val[n], ddof=1) for n in names], capsize=4,
           color=["#999", "#4c72b0", "#dd8452"])
    lo = min(min(v) for v in val.values())
    ax.set(ylabel="validation loss (± sd)", ylim=(lo - 0.05, None),
           title=f"THOR vs learned top-1, tiny preset, {len(a.seeds)} seeds")
    for i, name in enumerate(("thor", "thor_nocr")):
        ax.scatter([names.index(name)] * len(ensemble[name]), ensemble[name], marker="*", s=80, color="#222", zorder=3,
                   label="the ensemble of every expert" if i == 0 else None)
    ax.legend(fontsize=8)
    _zoo.save("thor", _zoo.payload("thor", a.steps, a.seeds, claims, alpha=ALPHA, val_loss=val,
                                   ensemble_val_loss=ensemble), fig)


if __name__ == "__main__":
    main()
