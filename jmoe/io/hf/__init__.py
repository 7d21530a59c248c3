"""Hugging Face checkpoints: the MoE Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2 and
DeepSeek-V3, and the dense Llama, Mistral, Qwen2 and Qwen3.

  cfg, params = jmoe.io.hf.load("path/to/model")          # LMConfig + the jmoe parameter tree
  model = jmoe.io.hf.load_model("path/to/model")          # model(input_ids) -> (logits, aux)
  jmoe.io.hf.save("out", cfg, params)                     # back to a transformers-loadable dir
  jmoe.io.hf.convert("path/to/model", "out")              # streamed, one leaf in memory at a time
"""

from jmoe.io.hf.architectures import ARCHITECTURES, DENSE_ARCHITECTURES, architecture_of
from jmoe.io.hf.convert import convert, iter_params, load, load_converted, load_model, plan, read_config, save

__all__ = ["ARCHITECTURES", "DENSE_ARCHITECTURES", "architecture_of", "convert", "iter_params", "load", "load_converted", "load_model",
           "plan", "read_config", "save"]
