"""Union of Experts' selective multi-head attention at small scale: each token's heads picked
by a router, against every head and against a fixed attention of the same per-token size.

Three variants of the tiny MoE (8 experts per layer, top-2; attention of 4 heads of width 32),
same batches per seed:
  top2    every head works for every token (the routing zoo's baseline)
  smha    selective heads (`AttentionConfig(head_top_k=2)`, `jmoe.nn.selective_heads`): a
          router picks 2 of the 4 heads per token (token selection, UoE's language-model
          setting of H / 2); the other heads' outputs are dropped for that token
  heads2  an attention of 2 heads of width 32: the query, attention and output work of
          smha per token, with one fixed pair of heads

Claims, paired by seed (UoE: its selective attention and MLP experts beat dense and MoE
models at lower FLOPs): smha keeps top2's validation loss (margin 0.02 nats) with half the
per-token head work, and beats heads2, which does the same work with fixed heads. The MLP
experts of UoE are slices of a dense MLP (`jmoe.merge.experts.partition`); trained from
scratch they are the fine-grained experts of fine_grained.py, so this script measures the
attention. Expert selection (each head picks its tokens) is not causal and is left out of a
language-model comparison. Writes experiments/results/union_of_experts.{json,png}; runs are
cached by configuration and code version.

    python experiments/union_of_experts.py [--steps 600] [--seeds 0 1 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402

MARGIN = 0.02
VARIANTS = ("top2", "smha", "heads2")


def attention_work(cfg) -> int:
    """Multiply-adds per token of the attention's query and output projections over every
    layer: the work that selective heads cut (keys and values are computed for every head)."""
    heads = cfg.attention.head_top_k or cfg.n_heads
    return 2 * cfg.n_layers * cfg.d_model * heads * cfg.head_dim


def main(argv=None):
    a = _zoo.args(argv)
    results = {v: _zoo.runs(v, a.steps, a.seeds) for v in VARIANTS}
    val = {v: _zoo.val_losses(results[v]) for v in VARIANTS}
    cfgs = {v: _zoo.VARIANTS[v]() for v in VARIANTS}
    claims = [
        _zoo.claim("selective heads (2 of 4 per token) keep every head's validation loss", "smha", val["smha"], "top2",
                   val["top2"], higher_is_better=False, margin=MARGIN),
        _zoo.claim("selective heads beat a fixed attention of the same per-token size", "smha", val["smha"], "heads2",
                   val["heads2"], higher_is_better=False),
    ]
    _zoo.print_claims(claims)
    params = {v: {"total": cfgs[v].num_params(), "active": cfgs[v].num_params(active=True)} for v in VARIANTS}
    work = {v: attention_work(cfgs[v]) for v in VARIANTS}
    for v in VARIANTS:
        print(f"{v}: {params[v]['active'] / 1e6:.3f}M active of {params[v]['total'] / 1e6:.3f}M parameters; "
              f"attention query/output work {work[v] / 1e3:.0f}k multiply-adds per token", flush=True)

    plt = _zoo.plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for v in VARIANTS:
        _zoo.plot_mean(axes[0], results[v], "loss", v)
    axes[0].set(xlabel="step", ylabel="training loss (smoothed, mean of seeds)", ylim=(None, 2.5))
    axes[0].legend()
    axes[1].bar(VARIANTS, [np.mean(val[v]) for v in VARIANTS], yerr=[np.std(val[v], ddof=1) for v in VARIANTS],
                capsize=4, color=["#999", "#4c72b0", "#dd8452"])
    axes[1].set(ylabel="validation loss (± sd)", ylim=(min(min(x) for x in val.values()) - 0.05, None))
    for i, v in enumerate(VARIANTS):
        axes[1].annotate(f"{work[v] / 1e3:.0f}k q/o MACs", (i, axes[1].get_ylim()[0]), ha="center", va="bottom",
                         fontsize=8, color="white")
    fig.suptitle(f"selective heads (Union of Experts), tiny preset, {len(a.seeds)} seeds")
    payload = _zoo.payload("union_of_experts", a.steps, a.seeds, claims, val_loss=val, params=params,
                           attention_work=work)
    _zoo.save("union_of_experts", payload, fig)


if __name__ == "__main__":
    main()
