"""Running MoE models: KV-cached, batched generation for jmoe runs and Hugging Face checkpoints.

>>> from jmoe import infer                                       # doctest: +SKIP
>>> model = infer.load("runs/tiny")                              # a run or a Hugging Face directory
>>> model.generate(["def ", "class "], max_new_tokens=32,
...                sampling=infer.SamplingParams(temperature=0.8, top_k=40))

  cache.py      the static-shape KV cache (GQA/MHA keys and values; MLA latents)
  attention.py  prefill and cached attention (MLA decodes with absorbed projections)
  forward.py    the model over a cache; the per-step MoE dispatch
  sampling.py   repetition penalty, temperature, top-k, top-p, min-p
  engine.py     buckets, compiled steps, stop ids, streaming, speed
  tokenizer.py  byte-level and Hugging Face tokenizers, chat templates
  load.py       open a run or a Hugging Face directory
  trace.py      routing traces (which experts every token used, layer by layer)
  locality.py   locality metrics of a trace: SRP, SCH, popularity, reuse distances, co-activation
  cachesim.py   expert-cache simulation: LRU, LFU, score-based, ARC, Belady; prefetch hooks
  predict.py    next-layer expert prediction: the cross-layer gate, a learned predictor
  offload.py    offloaded experts: a slow-tier store, device slots, caches, prefetch
"""

from jmoe.infer.cache import KVCache, init_cache, values_per_token
from jmoe.infer.engine import Engine, Generation, GenerationStats, generate
from jmoe.infer.forward import check_servable, extend, prefill, serving_moe, serving_params
from jmoe.infer.load import Model, ModelSource, load, open_model
from jmoe.infer.sampling import SamplingParams, process_logits, sample
from jmoe.infer.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from jmoe.infer.trace import RoutingTrace, TraceRecorder, recorder_for, trace_from_routings
from jmoe.infer.cachesim import CACHE_POLICIES, SimResult, hit_rate_curve, simulate

__all__ = [
    "ByteTokenizer",
    "CACHE_POLICIES",
    "RoutingTrace",
    "TraceRecorder",
    "recorder_for",
    "SimResult",
    "hit_rate_curve",
    "simulate",
    "trace_from_routings",
    "Engine",
    "Generation",
    "GenerationStats",
    "HFTokenizer",
    "KVCache",
    "Model",
    "ModelSource",
    "SamplingParams",
    "Tokenizer",
    "check_servable",
    "extend",
    "generate",
    "init_cache",
    "load",
    "load_tokenizer",
    "open_model",
    "prefill",
    "process_logits",
    "sample",
    "serving_moe",
    "serving_params",
    "values_per_token",
]
