"""Mowst, a mixture of a weak and a strong expert (Zeng et al., "Mixture of Weak & Strong
Experts on Graphs"; reference code facebookresearch/mowst-gnn), for language models.

The strong expert is the whole language model. The weak expert is a small MLP that predicts
the next token from the last `window` tokens alone (the reference's MLP sees a node's own
features without the graph; here a token without its long context). A gate turns the
dispersion of the weak expert's prediction into a confidence C in (0, 1):

    p = softmax(weak logits)                                   [..., V]
    var_conf = var(p) / var(one-hot) = (V sum p^2 - 1) / (V - 1)
    ent_conf = 1 - H(p) / log V
    C = sigmoid(gate_mlp([var_conf, ent_conf]))                (dispersion detached, as in
                                                                the reference's no_grad)

Training minimises the expected loss of picking the weak expert with probability C,

    L = mean(C * NLL_weak + (1 - C) * NLL_strong),

in alternating turns (`jmoe.train.mowst`): the weak expert and gate with the strong expert
frozen, then the strong expert with the weak one and the gate frozen. At inference a token
takes the weak expert's prediction where it is confident (C >= threshold, or with
probability C: the reference's random routing, whose expected loss is L) and the strong
expert's elsewhere; `mowst_scores` reports both and the share of tokens that skip the strong
expert.

Parameters (plain pytrees, `init_mowst`):
  weak  {"embed": [V + 1, e] (row V pads the window before the first token),
         "hidden": {"0": {"w": [window * e, h], "b": [h]}, "1": {"w": [h, h], ...}, ...},
         "out": {"w": [h, V], "b": [V]}}
  gate  {"0": {"w": [2, g], "b": [g]}, "1": {"w": [g, 1], "b": [1]}}
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jmoe.options import Options, option


@dataclasses.dataclass(frozen=True)
class MowstConfig(Options):
    """The weak expert and the gate (the reference's defaults: hidden 64, two layers)."""

    window: int = option(1, ge=1, le=64, doc="tokens the weak expert reads: the current one and window - 1 before it")
    embed_dim: int = option(64, ge=1, doc="the weak expert's embedding width per token")
    hidden: int = option(128, ge=1, doc="the weak expert's hidden width")
    layers: int = option(2, ge=1, le=8, doc="hidden layers of the weak expert's MLP (ReLU)")
    gate_hidden: int = option(64, ge=1, doc="hidden width of the gate's MLP over the two dispersion measures")

    @classmethod
    def owner(cls) -> str:
        return "mowst"


def _dense(key, n_in: int, n_out: int) -> dict:
    return {"w": jax.random.normal(key, (n_in, n_out), jnp.float32) / math.sqrt(n_in),
            "b": jnp.zeros((n_out,), jnp.float32)}


def init_mowst(key: jax.Array, vocab_size: int, mcfg: MowstConfig) -> dict:
    """{"weak": ..., "gate": ...} float32 parameters (module docstring) for a vocabulary of
    `vocab_size` tokens."""
    if not isinstance(mcfg, MowstConfig):
        raise ValueError(f"mcfg must be a MowstConfig, got {type(mcfg).__name__}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
    k_emb, k_hid, k_out, k_gate = jax.random.split(key, 4)
    widths = [mcfg.window * mcfg.embed_dim] + [mcfg.hidden] * mcfg.layers
    hidden = {str(j): _dense(k, widths[j], widths[j + 1])
              for j, k in enumerate(jax.random.split(k_hid, mcfg.layers))}
    weak = {"embed": jax.random.normal(k_emb, (vocab_size + 1, mcfg.embed_dim), jnp.float32),
            "hidden": hidden, "out": _dense(k_out, mcfg.hidden, vocab_size)}
    g1, g2 = jax.random.split(k_gate)
    return {"weak": weak, "gate": {"0": _dense(g1, 2, mcfg.gate_hidden), "1": _dense(g2, mcfg.gate_hidden, 1)}}


def _leaves(tree) -> dict:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_mowst_params(params: dict, vocab_size: int, mcfg: MowstConfig) -> None:
    """ValueError naming the first leaf ("weak/out/w") whose path or shape differs from `init_mowst`'s."""
    want = _leaves(jax.eval_shape(lambda: init_mowst(jax.random.key(0), vocab_size, mcfg)))
    got = _leaves(params)
    for name, spec in want.items():
        if name not in got:
            raise ValueError(f"Mowst parameters: {name} is missing")
        if tuple(got[name].shape) != tuple(spec.shape):
            raise ValueError(f"Mowst parameters: {name} has shape {tuple(got[name].shape)}, expected {tuple(spec.shape)}")
    extra = sorted(set(got) - set(want))
    if extra:
        raise ValueError(f"Mowst parameters: unexpected leaf {extra[0]}")


def windows(tokens: jax.Array, window: int, pad_id: int) -> jax.Array:
    """[B, S, window] ids: position t holds tokens t, t-1, ..., t-window+1 (pad_id before the start)."""
    cols = [tokens]
    for j in range(1, window):
        cols.append(jnp.pad(tokens, ((0, 0), (j, 0)), constant_values=pad_id)[:, : tokens.shape[1]])
    return jnp.stack(cols, axis=-1)


def weak_logits(weak: dict, tokens: jax.Array, mcfg: MowstConfig) -> jax.Array:
    """The weak expert's next-token logits [B, S, V] float32 from ids tokens [B, S] (each
    position sees its last `window` tokens). With `window` ids given per position
    (tokens [B, S, window], newest first), those are used as they are (decoding)."""
    pad_id = weak["embed"].shape[0] - 1
    ids = windows(tokens, mcfg.window, pad_id) if tokens.ndim == 2 else tokens
    h = weak["embed"][ids].reshape(*ids.shape[:-1], -1)
    for j in range(mcfg.layers):
        layer = weak["hidden"][str(j)]
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return h @ weak["out"]["w"] + weak["out"]["b"]


def dispersion(logits: jax.Array) -> jax.Array:
    """[..., 2] float32 (variance confidence, entropy confidence) of softmax(logits [..., V]),
    both in [0, 1] (1 for a one-hot prediction, 0 for the uniform one), gradient stopped."""
    logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
    V = logits.shape[-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(logp)
    var_conf = (V * jnp.sum(p * p, axis=-1) - 1.0) / (V - 1.0)
    entropy = -jnp.sum(p * logp, axis=-1)
    ent_conf = 1.0 - entropy / math.log(V)
    return jnp.stack([var_conf, ent_conf], axis=-1)


def confidence(gate: dict, disp: jax.Array) -> jax.Array:
    """C = sigmoid(MLP(disp)) [...] float32 from the dispersion disp [..., 2]."""
    h = jax.nn.relu(disp @ gate["0"]["w"] + gate["0"]["b"])
    return jax.nn.sigmoid((h @ gate["1"]["w"] + gate["1"]["b"])[..., 0])


def weak_outputs(params: dict, tokens: jax.Array, mcfg: MowstConfig) -> tuple[jax.Array, jax.Array]:
    """(weak logits [B, S, V], confidence C [B, S]) of tokens [B, S]."""
    logits = weak_logits(params["weak"], tokens, mcfg)
    return logits, confidence(params["gate"], dispersion(logits))


def mowst_loss(nll_weak: jax.Array, nll_strong: jax.Array, conf: jax.Array) -> jax.Array:
    """The expected loss mean(C * NLL_weak + (1 - C) * NLL_strong) over tokens ([B, S] each)."""
    return jnp.mean(conf * nll_weak + (1.0 - conf) * nll_strong)


def mowst_scores(nll_weak: jax.Array, nll_strong: jax.Array, conf: jax.Array, threshold: float) -> dict:
    """Scores of a Mowst model on tokens ([B, S] arrays), as floats:

      expected_loss   mowst_loss: the mean loss of the random routing (weak with probability C)
      expected_skip   mean C: the share of tokens that random routing gives the weak expert
      threshold_loss  the loss where tokens with C >= threshold take the weak prediction
      threshold_skip  the share of tokens with C >= threshold (the strong expert skipped)
      weak_loss, strong_loss   each expert alone
    """
    skip = conf >= threshold
    return {"expected_loss": float(mowst_loss(nll_weak, nll_strong, conf)), "expected_skip": float(jnp.mean(conf)),
            "threshold_loss": float(jnp.mean(jnp.where(skip, nll_weak, nll_strong))),
            "threshold_skip": float(jnp.mean(skip)), "weak_loss": float(jnp.mean(nll_weak)),
            "strong_loss": float(jnp.mean(nll_strong))}
