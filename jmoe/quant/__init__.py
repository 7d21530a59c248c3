"""Weight-only quantization of expert weights (`QuantizedArray`): round to nearest, HQQ and
GPTQ, as pytree transformations of a model's params; calibration on the tokens each expert
receives; MC-MoE's bit allocation; quantized run directories (`quantize_run`)."""

from jmoe.quant.allocate import allocate_bits
from jmoe.quant.experts import (METHODS, param_bytes, quantize_expert_weights, quantize_layer_experts,
                                quantize_lm_experts)
from jmoe.quant.gptq import gptq_experts, gptq_quantize, hessian
from jmoe.quant.hqq import quantize_hqq, refine_zero
from jmoe.quant.qarray import BITS, QuantizedArray, dense, pack, quantize_rtn, unpack

__all__ = ["BITS", "METHODS", "allocate_bits", "calibrate", "QuantizedArray", "dense", "gptq_experts", "gptq_quantize",
           "hessian", "pack", "param_bytes", "quantize_expert_weights", "quantize_hqq", "quantize_layer_experts",
           "quantize_lm_experts", "quantize_rtn", "quantize_run", "refine_zero", "unpack"]


def __getattr__(name):
    # these need jmoe.experts and jmoe.nn, which import this package's qarray
    if name == "calibrate":
        from jmoe.quant.calibration import calibrate

        return calibrate
    if name == "quantize_run":
        from jmoe.quant.run import quantize_run

        return quantize_run
    raise AttributeError(f"module 'jmoe.quant' has no attribute {name!r}")
