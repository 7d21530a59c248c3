"""Editing trained MoE models: unlearning in one expert (`uoe`).

>>> params, info = jmoe.editing.unlearn(cfg, params, forget_batches, method="ga")  # doctest: +SKIP
"""

from jmoe.editing.uoe import expert_affinity, target_expert, unlearn

__all__ = ["expert_affinity", "target_expert", "unlearn"]
