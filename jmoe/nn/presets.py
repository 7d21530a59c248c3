"""Named model + training presets for `jmoe train --preset NAME`.

  tiny   trains on 2 CPU cores in minutes (byte-level, E=8, k=2).
  small  a few times larger; CPU-trainable in an hour, quick on one accelerator.
  base   meant for accelerators and meshes: fine-grained experts (E=64, k=6) plus a shared one.

The dense FFN width of every preset equals k * the expert width, so `--dense` baselines have
the same active FFN parameters as the MoE model.
"""

from __future__ import annotations

from jmoe.config import MoEConfig
from jmoe.nn.transformer import LMConfig

PRESETS: dict[str, dict] = {
    "tiny": {
        "model": LMConfig(
            d_model=128, n_layers=4, n_heads=4, d_ff=512, max_seq_len=128,
            moe=MoEConfig(num_experts=8, top_k=2, d_model=128, d_ff=256),
        ),
        "train": dict(steps=600, batch_size=32, seq_len=128, lr=3e-3, warmup_steps=50, eval_every=100, ckpt_every=100),
    },
    "small": {
        "model": LMConfig(
            d_model=256, n_layers=6, n_heads=8, d_ff=1024, max_seq_len=256,
            moe=MoEConfig(num_experts=16, top_k=2, d_model=256, d_ff=512),
        ),
        "train": dict(steps=3000, batch_size=32, seq_len=256, lr=2e-3, warmup_steps=200, eval_every=250, ckpt_every=250),
    },
    "base": {
        "model": LMConfig(
            d_model=1024, n_layers=16, n_heads=16, n_kv_heads=4, d_ff=3072, max_seq_len=2048,
            moe=MoEConfig(num_experts=64, top_k=6, d_model=1024, d_ff=512, num_shared_experts=1, d_ff_shared=1024),
            dtype="bfloat16",
        ),
        "train": dict(steps=20000, batch_size=256, seq_len=2048, lr=1e-3, warmup_steps=1000, eval_every=1000, ckpt_every=1000),
    },
}


def preset(name: str) -> dict:
    """{"model": LMConfig, "train": dict of TrainConfig fields} for `name`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    p = PRESETS[name]
    return {"model": p["model"], "train": dict(p["train"])}
