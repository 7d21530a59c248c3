"""AdaMoE null experts on the tiny preset: M = 0, 2, 4, 8 null experts next to 8 true ones,
top-2 over all of them.

Claim checked: the mean number of true experts per token falls as M grows while the loss
stays flat. Writes experiments/results/null_experts.{json,png}.

    python experiments/null_experts.py [--steps 600]
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402


def main(argv=None):
    a = _zoo.args(argv)
    tc = _zoo.tiny_train(a.steps, a.seed)
    results = {0: _zoo.run("top2", _zoo.tiny(), tc)}
    for M in (2, 4, 8):
        results[M] = _zoo.run(f"null{M}", _zoo.tiny(router="null_experts", router_options=dict(num_null_experts=M)), tc)
    rows = [{"M": M, "val": r["summary"]["val_loss"], "ept": np.mean(r["late"]["experts_per_token"]),
             "layers": " / ".join(f"{v:.2f}" for v in r["late"]["experts_per_token"]),
             "tps": r["summary"]["tokens_per_s"]} for M, r in results.items()]
    print(_zoo.table(rows, [("null experts M", "{M}"), ("val loss", "{val:.4f}"), ("true experts/token", "{ept:.3f}"),
                            ("per layer", "{layers}"), ("tokens/s", "{tps:,.0f}")]))
    epts = [r["ept"] for r in rows]
    vals = [r["val"] for r in rows]
    falls = all(b <= a_ + 1e-3 for a_, b in zip(epts, epts[1:]))
    verdict = (f"true experts per token {' -> '.join(f'{e:.2f}' for e in epts)} for M = 0, 2, 4, 8 "
               f"({'falls' if falls else 'does NOT fall monotonically'}); validation loss "
               f"{' / '.join(f'{v:.4f}' for v in vals)} (spread {max(vals) - min(vals):.4f})")
    print(verdict)
    plt = _zoo.plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(list(results), epts, "o-")
    ax[0].set(xlabel="null experts M", ylabel="true experts per token (last 100 steps)")
    ax[1].plot(list(results), vals, "o-")
    ax[1].set(xlabel="null experts M", ylabel="validation loss")
    for x in ax:
        x.grid(alpha=0.3)
    _zoo.save("null_experts", {"command": f"python experiments/null_experts.py --steps {a.steps}", "rows": rows,
                               "verdict": verdict}, fig)


if __name__ == "__main__":
    main()
