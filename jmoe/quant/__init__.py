"""Weight-only quantization of expert weights (`QuantizedArray`): round to nearest, HQQ and
GPTQ, as pytree transformations of a model's params; MC-MoE's bit allocation."""

from jmoe.quant.allocate import allocate_bits
from jmoe.quant.experts import METHODS, param_bytes, quantize_expert_weights, quantize_lm_experts
from jmoe.quant.gptq import gptq_experts, gptq_quantize, hessian
from jmoe.quant.hqq import quantize_hqq, refine_zero
from jmoe.quant.qarray import BITS, QuantizedArray, dense, pack, quantize_rtn, unpack

__all__ = ["BITS", "METHODS", "allocate_bits", "QuantizedArray", "dense", "gptq_experts", "gptq_quantize", "hessian", "pack",
           "param_bytes", "quantize_expert_weights",
           "quantize_hqq", "quantize_lm_experts", "quantize_rtn", "refine_zero", "unpack"]
