"""Plain LoRA (Hu et al.): y = x W + (alpha / r) x A B on each targeted projection."""

from __future__ import annotations

from jmoe.adapters.base import Adapter, init_lora, lora_delta, dropout, projection_adapter
from jmoe.registry import ADAPTERS


def _init(key, d_in, d_out, cfg, dtype):
    return init_lora(key, d_in, d_out, cfg.rank, dtype)


def _delta(p, x, cfg, *, state=None, key=None):
    return lora_delta(p, dropout(x, cfg.dropout, key), cfg.scaling), None


LORA: Adapter = ADAPTERS.add("lora", projection_adapter(_init, _delta, uses=()))
