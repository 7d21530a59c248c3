"""Editing trained MoE models: unlearning in one expert (`uoe`), finding the experts to steer
(`steer`; the steering itself is the routing edit `jmoe.routing.steer`), compressed experts
(`compressed`; their computation is the dispatch `jmoe.dispatch.compressed`).

>>> params, info = jmoe.editing.unlearn(cfg, params, forget_batches, method="ga")  # doctest: +SKIP
"""

from jmoe.editing.compressed import active_expert_fraction, compress_experts, compressed_config
from jmoe.editing.steer import expert_npmi, top_experts
from jmoe.editing.uoe import expert_affinity, target_expert, unlearn

__all__ = ["active_expert_fraction", "compress_experts", "compressed_config", "expert_affinity", "expert_npmi",
           "target_expert", "top_experts", "unlearn"]
