"""UOE, unlearning one expert (Zhuang et al., "UOE: Unlearning One Expert Is Enough for
Mixture-of-Experts LLMs", later SEUF; reference code zhmzm/SEUF): to make an MoE model forget
a data set, find the routed expert most tied to it and unlearn in that expert only, with its
router anchored so that the forget data keeps going to it.

  1. Attribution (the paper's Eq. 2): each routed expert's affinity to the forget set is its
     router probability (the full softmax, not top-k counts) averaged over each sequence's
     tokens, then over the sequences; the target is the (layer, expert) with the highest
     affinity over every MoE layer (one expert, the paper's best; shared experts never).
  2. Unlearning on that expert's FFN weights and its layer's router only (everything else
     frozen, as the reference's `set_model_param`), with one of
       "ga"     gradient ascent: minimise -CE on the forget data;
       "gdiff"  gradient difference: -CE(forget) + retain_weight * CE(retain);
       "npo"    negative preference optimisation: -(2 / beta) log sigmoid(-beta (log p(seq) -
                log p_ref(seq))) over forget sequences, p_ref the model before unlearning
                (a frozen copy; the reference's NPO compares the model with itself);
     plus alpha times the router anchor (the reference's `ga_expert` loss): the mean squared
     difference between the anchored layer's router softmax on the forget tokens and the
     one-hot of the target expert.

scope="all" runs the same objective on every parameter without the anchor: the full-model
unlearning that UOE is measured against. The reference's defaults: lr 1e-4 (paper) with
Adam, alpha 1.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

METHODS = ("ga", "gdiff", "npo")
SCOPES = ("expert", "all")


def _check_batches(name: str, batches, vocab_size: int) -> None:
    if not isinstance(batches, (list, tuple)) or not batches:
        raise ValueError(f"{name} must be a non-empty list of token arrays [B, S]")
    for j, b in enumerate(batches):
        b = np.asarray(b)
        if b.ndim != 2 or not np.issubdtype(b.dtype, np.integer) or b.shape[1] < 2:
            raise ValueError(f"{name}[{j}] must be an integer token array [B, S] with S >= 2, got {b.dtype}{b.shape}")
        if b.size and (b.min() < 0 or b.max() >= vocab_size):
            raise ValueError(f"{name}[{j}]: token ids must be in [0, {vocab_size}), got {b.min()}..{b.max()}")


def _routers(params, tokens, cfg, state) -> list:
    """Every MoE layer's router softmax for tokens [B, S]: [B, S, C] per MoE layer."""
    from jmoe.nn import lm_apply

    _, aux = lm_apply(params, tokens, cfg, state=state)
    B, S = tokens.shape
    return [a.routing.probs.reshape(B, S, -1) for a in aux.moe]


def expert_affinity(cfg, params: dict, batches: Sequence, *, state: dict | None = None) -> np.ndarray:
    """[MoE layers, routed experts]: each expert's router probability averaged over each
    sequence's tokens, then over every sequence of `batches` (token arrays [B, S]). Layers
    with fewer experts than the widest (a compressed model) are padded with 0."""
    if cfg.moe is None:
        raise ValueError("expert_affinity needs an MoE model (cfg.moe is None)")
    _check_batches("batches", batches, cfg.vocab_size)
    fn = jax.jit(lambda p, t: [jnp.mean(r, axis=1) for r in _routers(p, t, cfg, state)])  # [B, C] per layer
    rows = [fn(params, jnp.asarray(b)) for b in batches]
    widths = [cfg.moe_for(i).num_ffn_choices for i in cfg.moe_layers]
    out = np.zeros((len(widths), max(widths)))
    for li, E in enumerate(widths):
        out[li, :E] = np.concatenate([np.asarray(r[li]) for r in rows]).mean(axis=0)[:E]
    return out


def target_expert(cfg, affinity: np.ndarray) -> tuple[int, int]:
    """(model layer index, expert) of the highest affinity over every MoE layer."""
    li, e = np.unravel_index(int(np.argmax(affinity)), affinity.shape)
    return cfg.moe_layers[int(li)], int(e)


def _lm_loss(params, tokens, cfg, state, per_sequence: bool = False):
    from jmoe.nn import lm_apply

    logits, _ = lm_apply(params, tokens[:, :-1], cfg, state=state)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return jnp.sum(nll, axis=-1) if per_sequence else jnp.mean(nll)


def unlearn(cfg, params: dict, forget: Sequence, retain: Sequence | None = None, *, scope: str = "expert",
            method: str = "ga", layer: int | None = None, expert: int | None = None, alpha: float = 1.0,
            retain_weight: float = 1.0, npo_beta: float = 0.1, steps: int = 50, lr: float = 1e-4,
            state: dict | None = None, log: Callable[[int, float], None] | None = None,
            callback: Callable[[int, dict], None] | None = None) -> tuple[dict, dict]:
    """Unlearn the forget data (token arrays [B, S]; step s uses batch s mod len) as the
    module docstring says; retain: token arrays of data to keep (gdiff). layer/expert: the
    target (default: the highest affinity to the forget data). log(step, loss) every step;
    callback(steps done, params) after every step (to pick a stopping point).
    Returns (params, info: the target, its affinity table, trainable parameters, losses)."""
    if cfg.moe is None and scope == "expert":
        raise ValueError("scope='expert' needs an MoE model (cfg.moe is None); use scope='all'")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} must be one of {', '.join(SCOPES)}")
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {', '.join(METHODS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} must be an integer >= 0")
    for name, v in (("lr", lr), ("npo_beta", npo_beta)):
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
            raise ValueError(f"{name}={v!r} must be a number > 0")
    for name, v in (("alpha", alpha), ("retain_weight", retain_weight)):
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
            raise ValueError(f"{name}={v!r} must be a number >= 0")
    _check_batches("forget", forget, cfg.vocab_size)
    if method == "gdiff":
        if not retain:
            raise ValueError("method='gdiff' needs retain batches")
    if retain:
        _check_batches("retain", retain, cfg.vocab_size)
    if cfg.adapter is not None:
        raise ValueError("unlearn edits a model without adapters (merge or drop them first)")

    info: dict[str, Any] = {"scope": scope, "method": method}
    if cfg.moe is not None:
        affinity = expert_affinity(cfg, params, forget, state=state)
        info["affinity"] = affinity.round(6).tolist()
        if layer is None and expert is None:
            layer, expert = target_expert(cfg, affinity)
        elif layer is None or expert is None:
            raise ValueError("give both layer and expert, or neither (the highest affinity)")
    if scope == "expert":
        if layer not in cfg.moe_layers:
            raise ValueError(f"layer={layer} is not an MoE layer; MoE layers: {list(cfg.moe_layers)}")
        E = cfg.moe_for(layer).num_experts
        if not 0 <= expert < E:
            raise ValueError(f"expert={expert} must be in [0, {E}) for layer {layer}")
        info.update(layer=int(layer), expert=int(expert))
    L = str(layer) if scope == "expert" else None
    moe_index = cfg.moe_layers.index(layer) if scope == "expert" else None

    def split(p):
        if scope == "all":
            return p
        moe = p["layers"][L]["moe"]
        return {"experts": {k: v[expert] for k, v in moe["experts"].items()}, "router": moe["router"]}

    def join(sub, base):
        if scope == "all":
            return sub
        layer_p = base["layers"][L]
        moe = layer_p["moe"]
        experts = {k: v.at[expert].set(sub["experts"][k]) for k, v in moe["experts"].items()}
        return {**base, "layers": {**base["layers"], L: {**layer_p, "moe": {**moe, "experts": experts,
                                                                            "router": sub["router"]}}}}

    trainable = split(params)
    info["trainable_params"] = int(sum(np.prod(x.shape) for x in jax.tree.leaves(trainable)))
    info["total_params"] = int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))

    def objective(sub, base, f_tokens, r_tokens, ref_logp):
        p = join(sub, base)
        if method == "npo":
            logp = -_lm_loss(p, f_tokens, cfg, state, per_sequence=True)
            loss = -(2.0 / npo_beta) * jnp.mean(jax.nn.log_sigmoid(-npo_beta * (logp - ref_logp)))
        else:
            loss = -_lm_loss(p, f_tokens, cfg, state)
        if method == "gdiff":
            loss = loss + retain_weight * _lm_loss(p, r_tokens, cfg, state)
        if scope == "expert" and alpha:
            probs = _routers(p, f_tokens, cfg, state)[moe_index]  # [B, S, C]
            target = jax.nn.one_hot(expert, probs.shape[-1])
            loss = loss + alpha * jnp.mean((probs - target) ** 2)
        return loss

    opt = optax.adam(lr)
    opt_state = opt.init(trainable)

    @jax.jit
    def step(sub, opt_state, base, f_tokens, r_tokens, ref_logp):
        loss, grad = jax.value_and_grad(objective)(sub, base, f_tokens, r_tokens, ref_logp)
        updates, opt_state = opt.update(grad, opt_state, sub)
        return optax.apply_updates(sub, updates), opt_state, loss

    ref = jax.jit(lambda p, t: -_lm_loss(p, t, cfg, state, per_sequence=True)) if method == "npo" else None
    losses = []
    for s in range(steps):
        f = jnp.asarray(forget[s % len(forget)])
        r = jnp.asarray(retain[s % len(retain)]) if retain else f
        ref_logp = ref(params, f) if ref is not None else jnp.zeros(f.shape[0])
        trainable, opt_state, loss = step(trainable, opt_state, params, f, r, ref_logp)
        losses.append(float(loss))
        if log is not None:
            log(s, losses[-1])
        if callback is not None:
            callback(s + 1, join(trainable, params))
    info["loss_first"], info["loss_last"] = (losses[0], losses[-1]) if losses else (None, None)
    return join(trainable, params), info
