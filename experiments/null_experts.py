"""AdaMoE null experts on the tiny preset: M = 0, 2, 4, 8 null experts next to 8 true ones,
top-2 over all of them.

With the balance loss over all 8 + M choices, a uniform load sends 2 * 8 / (8 + M) true
experts to the average token, so the mean alone says little. AdaMoE's claim is that the
router spends its true experts where they are needed: token adaptivity. It is measured here
directly: on the validation tokens, Spearman's correlation between a token's difficulty
(its loss under the top-2 model of the same seed, which does not depend on the null routing)
and the number of true experts it gets (mean over the MoE layers).

Claims checked (paired by seed): true experts per token fall below top-2's; validation loss
no worse than top-2 (by more than 0.005); harder tokens get more true experts (correlation
above 0). Writes experiments/results/null_experts.{json,png}.

    python experiments/null_experts.py [--steps 600] [--seeds 0 1 2]
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402

from jmoe.evals.stats import goal_verdict  # noqa: E402

MARGIN = 0.005
MS = (2, 4, 8)
QUANTILES = 5


def adaptivity(result: dict, reference: dict) -> dict:
    """Spearman rho between the reference model's per-token loss and the true experts of
    `result`, and the mean true experts per difficulty quintile."""
    tr, ref = _zoo.token_routing(result), _zoo.token_routing(reference)
    experts = tr["ffn_experts"].mean(0)
    difficulty = ref["loss"]
    edges = np.quantile(difficulty, np.linspace(0, 1, QUANTILES + 1))
    bins = np.clip(np.searchsorted(edges, difficulty, side="right") - 1, 0, QUANTILES - 1)
    return {"rho": _zoo.spearman(difficulty, experts),
            "by_quintile": [float(experts[bins == q].mean()) for q in range(QUANTILES)]}


def main(argv=None):
    a = _zoo.args(argv)
    base = _zoo.runs("top2", a.steps, a.seeds)
    results = {M: _zoo.runs(f"null{M}", a.steps, a.seeds) for M in MS}
    ept = {M: [float(np.mean(r["late"]["experts_per_token"])) for r in rs] for M, rs in results.items()}
    adapt = {M: [adaptivity(r, b) for r, b in zip(rs, base)] for M, rs in results.items()}
    rows = [{"M": 0, "val": _zoo.fmt_ci(_zoo.summary(_zoo.val_losses(base))), "ept": "2.000", "uniform": "2.000", "rho": ""}]
    claims, adaptivity_claims = [], []
    for M, rs in results.items():
        rhos = [x["rho"] for x in adapt[M]]
        rows.append({"M": M, "val": _zoo.fmt_ci(_zoo.summary(_zoo.val_losses(rs))), "ept": _zoo.fmt_ci(_zoo.summary(ept[M]), 3),
                     "uniform": f"{2 * 8 / (8 + M):.3f}", "rho": _zoo.fmt_ci(_zoo.summary(rhos), 3)})
        claims.append(_zoo.claim(f"M = {M}: fewer true experts per token than top-2", f"null{M}", ept[M], "top2",
                                 [2.0] * len(rs), higher_is_better=False))
        claims.append(_zoo.claim(f"M = {M}: validation loss no worse than top-2", f"null{M}", _zoo.val_losses(rs),
                                 "top2", _zoo.val_losses(base), higher_is_better=False, margin=MARGIN))
        s = _zoo.summary(rhos)
        adaptivity_claims.append({"claim": f"M = {M}: harder tokens get more true experts (Spearman rho > 0)",
                                  "summary": s, "verdict": goal_verdict(s, 0.0, higher_is_better=True),
                                  "by_quintile_per_seed": [x["by_quintile"] for x in adapt[M]]})
    print(_zoo.table(rows, [("null experts M", "{M}"), ("val loss", "{val}"), ("true experts/token", "{ept}"),
                            ("uniform load 2*8/(8+M)", "{uniform}"), ("rho(difficulty, experts)", "{rho}")]))
    _zoo.print_claims(claims)
    for c in adaptivity_claims:
        lo, hi = c["summary"]["ci95"]
        print(f"{c['claim']}: rho {c['summary']['mean']:+.3f} (95% CI {lo:+.3f}..{hi:+.3f}) -> {c['verdict']}")
    plt = _zoo.plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for M in MS:
        q = np.asarray([x["by_quintile"] for x in adapt[M]])
        ax[0].errorbar(np.arange(1, QUANTILES + 1), q.mean(0), yerr=q.std(0, ddof=1), capsize=3, marker="o", label=f"M={M}")
    ax[0].set(xlabel="difficulty quintile (top-2 model's loss on the token)", ylabel="true experts per token",
              xticks=list(range(1, QUANTILES + 1)),
              title="token adaptivity (± sd over seeds)")
    vals = [_zoo.val_losses(base)] + [_zoo.val_losses(results[M]) for M in MS]
    ax[1].errorbar((0, *MS), [np.mean(v) for v in vals], yerr=[np.std(v, ddof=1) for v in vals], marker="o", capsize=3)
    ax[1].set(xlabel="null experts M", ylabel="validation loss (± sd)", xticks=(0, *MS))
    for x in ax:
        x.grid(alpha=0.3)
    ax[0].legend()
    _zoo.save("null_experts", _zoo.payload("null_experts", a.steps, a.seeds, claims, rows=rows,
                                           adaptivity=adaptivity_claims), fig)


if __name__ == "__main__":
    main()
