"""Finding the experts to steer (RICE, "Two Experts Are All You Need for Steering Thinking"):
the experts whose selection tracks a behaviour, by normalised pointwise mutual information.

Tokens of prompts that show the behaviour (positive) are contrasted with tokens of prompts that
do not (negative). For each MoE layer and expert, over the T tokens of both sets, M of them
positive:

    k = positive tokens routed to the expert, K = tokens routed to it,
    nPMI = [log2(k / M) + log2(T / K)] / log2(T / k)           (-1 when k = 0)

i.e. PMI(positive, expert) / -log2 p(positive, expert), in [-1, 1]: 1 when the expert is chosen
for exactly the positive tokens. The paper scores experts on thinking markers ("<think>"
tokens against the rest); the experts with the highest nPMI over every MoE layer are
reinforced at inference with `jmoe.routing.steer` (`jmoe generate --steer-experts`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _routing_counts(cfg, params, prompts: Sequence[Sequence[int]], state, batch_size: int) -> np.ndarray:
    """[MoE layers, E] tokens routed to each expert, over the prompts' tokens."""
    from jmoe.nn import lm_apply

    widths = [cfg.moe_for(i).num_ffn_choices for i in cfg.moe_layers]
    counts = np.zeros((len(widths), max(widths)))
    S = max(len(p) for p in prompts)

    @jax.jit
    def chosen(params, tokens):
        _, aux = lm_apply(params, tokens, cfg, state=state)
        B = tokens.shape[0]
        return [(a.routing.expert_ids.reshape(B, S, -1), a.routing.mask.reshape(B, S, -1)) for a in aux.moe]

    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo: lo + batch_size]
        tokens = np.zeros((batch_size, S), np.int32)
        valid = np.zeros((batch_size, S), bool)
        for r, p in enumerate(chunk):
            tokens[r, : len(p)], valid[r, : len(p)] = p, True  # right-padded: the model is causal
        for li, (ids, mask) in enumerate(chosen(params, jnp.asarray(tokens))):
            ids, mask = np.asarray(ids), np.asarray(mask) & valid[..., None]
            E = widths[li]
            keep = mask & (ids < E)
            counts[li, :E] += np.bincount(ids[keep], minlength=E)[:E]
    return counts


def _check_prompts(name: str, prompts, cfg) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"{name} must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        ids = [int(t) for t in np.asarray(p, np.int64).reshape(-1)]
        if not ids:
            raise ValueError(f"{name}[{i}] is empty")
        if min(ids) < 0 or max(ids) >= cfg.vocab_size:
            raise ValueError(f"{name}[{i}]: token ids must be in [0, {cfg.vocab_size})")
        if len(ids) > cfg.max_seq_len:
            raise ValueError(f"{name}[{i}] has {len(ids)} tokens, more than the model's context of {cfg.max_seq_len}")
        out.append(ids)
    return out


def expert_npmi(cfg, params: dict, positive: Sequence[Sequence[int]], negative: Sequence[Sequence[int]], *,
                state: dict | None = None, batch_size: int = 16) -> np.ndarray:
    """[MoE layers, E] nPMI of each expert's selection with the positive prompts' tokens
    against the negative prompts' (token-id lists; see the module docstring). Experts a
    narrower layer lacks are -1."""
    if not cfg.moe_layers:
        raise ValueError("expert_npmi needs an MoE model (it has no MoE layers)")
    positive, negative = _check_prompts("positive", positive, cfg), _check_prompts("negative", negative, cfg)
    k = _routing_counts(cfg, params, positive, state, batch_size)
    K = k + _routing_counts(cfg, params, negative, state, batch_size)
    M = sum(map(len, positive))
    T = M + sum(map(len, negative))
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log2(k / M) + np.log2(T / K)
        npmi = pmi / np.log2(T / k)
    npmi = np.where(k == 0, -1.0, npmi)
    return np.where(np.isfinite(npmi), npmi, 1.0)  # k = T: the expert is the positive tokens' only one


def top_experts(cfg, npmi: np.ndarray, top: int = 2) -> list[tuple[int, int, float]]:
    """The `top` (model layer, expert, nPMI) of the highest nPMI over every MoE layer."""
    if not 1 <= top <= npmi.size:
        raise ValueError(f"top={top} must be in [1, {npmi.size}]")
    flat = np.argsort(-npmi, axis=None, kind="stable")[:top]
    return [(cfg.moe_layers[int(li)], int(e), float(npmi[li, e]))
            for li, e in zip(*np.unravel_index(flat, npmi.shape))]
