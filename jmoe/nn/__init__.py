"""Flax NNX modules over jmoe's pure functions, and the MoE transformer LM."""

from jmoe.nn.module import ParamModule, RouterState
from jmoe.nn.moe import MoE
from jmoe.nn.transformer import LMAux, LMConfig, TransformerLM, init_lm, init_lm_state, lm_apply, token_nll
from jmoe.nn.presets import PRESETS, preset

__all__ = [
    "LMAux",
    "LMConfig",
    "MoE",
    "PRESETS",
    "ParamModule",
    "RouterState",
    "TransformerLM",
    "init_lm",
    "init_lm_state",
    "lm_apply",
    "preset",
    "token_nll",
]
