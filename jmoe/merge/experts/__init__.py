"""Expert merging, compression, pruning and upcycling for MoE models (jmoe LMs, and Hugging
Face checkpoints converted with `jmoe.io.hf`).

  stats     = collect_routing_stats(params, cfg, calibration_batches)
  p, c, g   = merge_experts(params, cfg, stats, target_experts=4, method="msmoe")   # M-SMoE
  p, c, k   = prune_experts(params, cfg, stats, target_experts=4)                   # baseline
  p, f, rep = compress_experts(p, c, rank=16, sparsity=0.9)                         # MC-SMoE
  p, c      = upcycle(dense_params, dense_cfg, num_experts=8, top_k=2, key=key)
  p, c      = partition(dense_params, dense_cfg, num_experts=4, top_k=2)              # UoE slices

`COMPRESS_METHODS` is the table of `jmoe compress` methods (msmoe, mcsmoe, average, random,
prune); each registers itself next to its code.
"""

from jmoe.merge.experts.align import activation_matching, permute_expert, weight_matching
from jmoe.merge.experts.compress import compress_experts, compressed_size, expert_gradients, low_rank
from jmoe.merge.experts.msmoe import allocate_dominant, group_by_routing, merge_experts, merge_groups, random_groups
from jmoe.merge.experts.prune import prune_experts, prune_layer
from jmoe.merge.experts.registry import COMPRESS_METHODS, CompressMethod, register_compress_method
from jmoe.merge.experts.stats import collect_expert_inputs, collect_routing_stats, load_stats, router_logit_similarity, save_stats
from jmoe.merge.experts.upcycle import bam, partition, upcycle

__all__ = [
    "COMPRESS_METHODS",
    "CompressMethod",
    "activation_matching",
    "allocate_dominant",
    "bam",
    "collect_expert_inputs",
    "collect_routing_stats",
    "compress_experts",
    "compressed_size",
    "expert_gradients",
    "group_by_routing",
    "load_stats",
    "low_rank",
    "merge_experts",
    "merge_groups",
    "permute_expert",
    "prune_experts",
    "prune_layer",
    "random_groups",
    "register_compress_method",
    "router_logit_similarity",
    "save_stats",
    "partition",
    "upcycle",
    "weight_matching",
]
