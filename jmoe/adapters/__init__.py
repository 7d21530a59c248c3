"""Trainable adapters on frozen models: plain LoRA, three mixtures of LoRA experts, and two
routed mixtures of fine-tunes' task vectors built by merging.

  lora     (alpha / r) x A B on each targeted projection
  mixlora  top-k LoRA experts on the FFN, one router per layer (MixLoRA)
  smora    each rank of one LoRA is an expert; a token activates a few ranks (SMoRA)
  dynmole  LoRA experts per projection, Tsallis-entropy hybrid routing (DynMoLE)
  wemoe    task vectors of fine-tunes mixed per token by a router (WEMoE; `jmoe.merge.wemoe`)
  twin     low-rank exclusive knowledge of fine-tunes mixed per token by a softmax router
           (Twin-Merging; `jmoe.merge.twin_merging`)

`LMConfig(adapter=AdapterConfig(...))` names the adapter; `init_adapters(key, cfg)` gives
`params["adapters"]`, which `lm_apply` and the inference engine then run. A new kind is one
file with one `jmoe.registry.ADAPTERS.add(...)` (see `jmoe.adapters.base`).
"""

from jmoe.adapters import dynmole, lora, mixlora, smora, twin, wemoe  # noqa: F401  (registers the kinds)
from jmoe.adapters.base import Adapter, AdapterAux, adapted_ffn, init_lora, lora_delta, projection_adapter
from jmoe.adapters.config import FFN_TARGETS, AdapterConfig
from jmoe.adapters.model import (adapted_attention, adapted_experts, adapted_ffn_layer, adapter_layers, check_adapter,
                                 check_adapter_params, fold_weight_lora, init_adapter_state, init_adapters,
                                 matrix_shape, mean_adapter_loss, merge_lora, update_adapter_state)

__all__ = ["FFN_TARGETS", "Adapter", "AdapterAux", "AdapterConfig", "adapted_attention", "adapted_experts", "adapted_ffn",
           "adapted_ffn_layer", "adapter_layers", "check_adapter", "check_adapter_params", "fold_weight_lora",
           "init_adapter_state", "init_adapters", "init_lora", "lora_delta", "matrix_shape", "mean_adapter_loss",
           "merge_lora", "projection_adapter", "update_adapter_state"]
