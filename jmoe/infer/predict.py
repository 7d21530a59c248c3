"""Predicting the experts of the next MoE layer, for prefetching (expert offloading).

Two predictors, both judged by the same accuracy: the share of the experts a token actually
uses at a layer that are among the k experts predicted for it (top-k recall, Fate's measure).

- The cross-layer gate (Fate): MoE layer j's router applied to the input of MoE layer j - n
  (n = lookahead). The residual stream changes little from one layer to the next, so the
  router of the next layer already picks (mostly) the right experts one layer early.
  `gate_accuracy` measures it on token sequences for lookahead 1..n; traces recorded by the
  engine carry the lookahead-1 guesses (`RoutingTrace.gate_ids`, `trace_gate_accuracy`).
- A learned predictor (`LearnedPredictor`), trained on a routing trace alone: per target
  layer j a logistic regression from the experts the token used at the layers before j
  (up to j - n) and the experts the previous token of its sequence used at every layer
  (what a decoder knows when it reaches layer j - n), to the experts of layer j.

>>> import numpy as np
>>> topk_recall(np.array([[0, 1], [2, 3]]), np.array([[1, 0], [2, 1]]))
0.75
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmoe.infer.forward import gate_routing
from jmoe.infer.trace import RoutingTrace
from jmoe.layer import ffn_routing
from jmoe.nn.transformer import LMConfig, lm_apply

PREDICTOR_FORMAT = "jmoe-expert-predictor"
PREDICTOR_VERSION = 1


def topk_recall(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Share of the actual experts (ids >= 0) found among the predicted ones of the same row.

    predicted: [T, k'] expert ids (-1 = none); actual: [T, k] expert ids (-1 = unused).
    NaN when `actual` holds no expert.
    """
    predicted, actual = np.asarray(predicted), np.asarray(actual)
    if predicted.ndim != 2 or actual.ndim != 2 or predicted.shape[0] != actual.shape[0]:
        raise ValueError(f"predicted and actual must be [T, k] arrays with the same T, got {predicted.shape} "
                         f"and {actual.shape}")
    valid = actual >= 0
    found = (actual[:, :, None] == predicted[:, None, :]).any(-1) & valid
    n = valid.sum()
    return float(found.sum() / n) if n else float("nan")


def trace_gate_accuracy(trace: RoutingTrace) -> list[float | None]:
    """Top-k recall of the recorded cross-layer gate guesses per MoE layer (None at the first
    layer, which has no guess). ValueError when the trace has no `gate_ids`."""
    if trace.gate_ids is None:
        raise ValueError("the trace has no gate_ids (record it with the inference engine: jmoe trace)")
    out: list[float | None] = [None]
    for l in range(1, trace.num_layers):
        out.append(topk_recall(trace.gate_ids[:, l], trace.expert_ids[:, l]))
    return out


@partial(jax.jit, static_argnames=("cfg",))
def _routing_and_inputs(params, state, tokens, cfg):
    _, aux = lm_apply(params, tokens, cfg, state=state, keep_moe_inputs=True)
    return aux.moe, aux.moe_inputs


def gate_accuracy(cfg: LMConfig, params: dict, state: dict | None, tokens: np.ndarray,
                  lookaheads: Sequence[int] = (1, 2, 3)) -> dict[int, list[float | None]]:
    """Top-k recall of the cross-layer gate per MoE layer, for each lookahead n: MoE layer j's
    router on the input (and routing carry) of MoE layer j - n, against what layer j chose.

    Args:
      tokens: [B, S] token sequences (teacher forced).
      lookaheads: the n to measure (1 .. number of MoE layers - 1).
    Returns:
      {n: [recall of MoE layer j for j in 0..L-1]}, None where j < n.
    """
    layers = list(cfg.moe_layers)
    L = len(layers)
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be an integer [B, S] array, got {tokens.dtype}{tokens.shape}")
    for n in lookaheads:
        if not isinstance(n, (int, np.integer)) or not 1 <= n < L:
            raise ValueError(f"lookahead {n!r} must be an integer in [1, {L - 1}] (the model has {L} MoE layers)")
    state = state or {}
    auxes, inputs = _routing_and_inputs(params, state, jnp.asarray(tokens, jnp.int32), cfg)
    actual = []
    for i, a in zip(layers, auxes):
        moe = cfg.moe_for(i)
        r = ffn_routing(a.routing, moe)
        keep = r.mask & (r.expert_ids >= 0) & (r.expert_ids < moe.num_experts)
        actual.append(np.asarray(jnp.where(keep, r.expert_ids, -1)))
    out = {}
    for n in lookaheads:
        accs: list[float | None] = [None] * n
        for j in range(n, L):
            i = layers[j]
            guess = gate_routing(params["layers"][str(i)]["moe"]["router"], inputs[j - n], cfg.moe_for(i),
                                 state.get(str(i)), auxes[j - n].routing.carry)
            accs.append(topk_recall(np.asarray(guess), actual[j]))
        out[int(n)] = accs
    return out


# ----------------------------------------------------------------------------- learned predictor
def _previous_token(seq_ids: np.ndarray) -> np.ndarray:
    """[N] index of the previous token of the same sequence (processing order), -1 if none."""
    prev = np.full(seq_ids.shape, -1, np.int64)
    last: dict[int, int] = {}
    for t, s in enumerate(seq_ids.tolist()):
        prev[t] = last.get(s, -1)
        last[s] = t
    return prev


def _multi_hot(ids: np.ndarray, E: int) -> np.ndarray:
    """[..., k] ids (-1 = none) -> [..., E] float32 0/1."""
    out = np.zeros(ids.shape[:-1] + (E + 1,), np.float32)
    np.put_along_axis(out, np.where(ids >= 0, ids, E), 1.0, axis=-1)
    return out[..., :E]


def predictor_features(current: np.ndarray, previous: np.ndarray, num_experts: int) -> np.ndarray:
    """Features of tokens: the multi-hot experts of the token at every layer (the caller zeroes
    the layers it may not see) and of its previous token at every layer.

    current, previous: [T, L, k] expert ids (-1 = none; a first token's previous is all -1).
    Returns [T, 2 * L * E] float32.
    """
    T = current.shape[0]
    return np.concatenate([_multi_hot(current, num_experts).reshape(T, -1),
                           _multi_hot(previous, num_experts).reshape(T, -1)], axis=1)


@partial(jax.jit, static_argnames=("steps",))
def _fit(x, y, visible, w0, b0, lr, steps):
    """Full-batch Adam on the sigmoid cross-entropy of one logistic regression per target layer.
    x [N, F]; y [Lt, N, E]; visible [Lt, F] feature masks; w0 [Lt, F, E]; b0 [Lt, E]."""
    opt = optax.adam(lr)

    def loss(p):
        w, b = p
        logits = jnp.einsum("nf,lfe->lne", x, w * visible[:, :, None]) + b[:, None, :]
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))

    def step(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    p = (w0, b0)
    (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=steps)
    return p


class LearnedPredictor:
    """Per MoE layer j >= lookahead, a logistic regression from what a decoder knows at layer
    j - lookahead (the token's experts at layers <= j - lookahead, its previous token's
    experts at every layer) to the experts of layer j. Train with `fit`, use with `predict`.

    Attributes:
      w: [L, 2*L*E, E] float32 weights (layers below the lookahead are unused).
      b: [L, E] float32 biases.
      num_experts: E.
      top_k: experts predicted per token.
      lookahead: layers ahead the predictor sees.
    """

    def __init__(self, w: np.ndarray, b: np.ndarray, num_experts: int, top_k: int, lookahead: int = 1):
        self.w, self.b = np.asarray(w, np.float32), np.asarray(b, np.float32)
        self.num_experts, self.top_k, self.lookahead = int(num_experts), int(top_k), int(lookahead)
        L = self.w.shape[0]
        if self.w.shape != (L, 2 * L * self.num_experts, self.num_experts) or self.b.shape != (L, self.num_experts):
            raise ValueError(f"predictor weights must be [L, 2*L*E, E] and [L, E] with E = {self.num_experts}, got "
                             f"{self.w.shape} and {self.b.shape}")

    @property
    def num_layers(self) -> int:
        return int(self.w.shape[0])

    @staticmethod
    def visible(L: int, E: int, lookahead: int) -> np.ndarray:
        """[L, 2*L*E] bool: the features target layer j may use."""
        vis = np.zeros((L, 2, L, E), bool)
        for j in range(L):
            vis[j, 0, : max(0, j - lookahead + 1)] = True
            vis[j, 1] = True
        return vis.reshape(L, -1)

    @classmethod
    def fit(cls, trace: RoutingTrace, *, lookahead: int = 1, steps: int = 300, learning_rate: float = 0.05,
            seed: int = 0) -> "LearnedPredictor":
        """Train on a trace (every token; the previous token is the one before in its sequence)."""
        if not isinstance(trace, RoutingTrace):
            raise ValueError(f"trace must be a RoutingTrace, got {type(trace).__name__}")
        L, E = trace.num_layers, trace.num_experts
        if not isinstance(lookahead, (int, np.integer)) or not 1 <= lookahead < max(L, 2):
            raise ValueError(f"lookahead {lookahead!r} must be an integer in [1, {max(L - 1, 1)}]")
        if L < 2:
            raise ValueError("a predictor needs a trace of at least 2 MoE layers")
        prev = _previous_token(trace.seq_ids)
        ids = trace.expert_ids
        prev_ids = np.where(prev[:, None, None] >= 0, ids[np.maximum(prev, 0)], -1)
        x = predictor_features(ids, prev_ids, E)
        y = np.moveaxis(_multi_hot(ids, E), 1, 0)  # [L, N, E]
        F = x.shape[1]
        w0 = 0.01 * jax.random.normal(jax.random.key(seed), (L, F, E), jnp.float32)
        w, b = _fit(jnp.asarray(x), jnp.asarray(y), jnp.asarray(cls.visible(L, E, lookahead), jnp.float32), w0,
                    jnp.zeros((L, E), jnp.float32), learning_rate, steps)
        return cls(np.asarray(w), np.asarray(b), E, trace.top_k, lookahead)

    def predict(self, layer: int, current: np.ndarray, previous: np.ndarray) -> np.ndarray:
        """The top_k experts predicted at MoE layer `layer` ([T, k] int32, best first).

        current: [T, L, k] the tokens' experts (layers at or past layer - lookahead + 1 are
        ignored, so they may hold anything); previous: [T, L, k] their previous tokens'."""
        if not self.lookahead <= layer < self.num_layers:
            raise ValueError(f"layer {layer} must lie in [{self.lookahead}, {self.num_layers}) for lookahead "
                             f"{self.lookahead}")
        x = predictor_features(current, previous, self.num_experts)
        vis = self.visible(self.num_layers, self.num_experts, self.lookahead)[layer]
        logits = (x * vis) @ self.w[layer] + self.b[layer]
        return np.argsort(-logits, axis=1, kind="stable")[:, : self.top_k].astype(np.int32)

    def accuracy(self, trace: RoutingTrace) -> list[float | None]:
        """Top-k recall per MoE layer on a trace (None below the lookahead)."""
        if trace.num_layers != self.num_layers or trace.num_experts != self.num_experts:
            raise ValueError(f"the trace has {trace.num_layers} MoE layers of {trace.num_experts} experts; the "
                             f"predictor was trained for {self.num_layers} of {self.num_experts}")
        prev = _previous_token(trace.seq_ids)
        ids = trace.expert_ids
        prev_ids = np.where(prev[:, None, None] >= 0, ids[np.maximum(prev, 0)], -1)
        out: list[float | None] = [None] * self.lookahead
        for j in range(self.lookahead, self.num_layers):
            out.append(topk_recall(self.predict(j, ids, prev_ids), ids[:, j]))
        return out

    # ------------------------------------------------------------------ io
    def save(self, path) -> Path:
        path = Path(path)
        np.savez(path, format=np.array(PREDICTOR_FORMAT), version=np.array(PREDICTOR_VERSION), w=self.w, b=self.b,
                 num_experts=np.array(self.num_experts), top_k=np.array(self.top_k),
                 lookahead=np.array(self.lookahead))
        return path

    @classmethod
    def load(cls, path) -> "LearnedPredictor":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"expert predictor {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"expert predictor {path} cannot be read ({type(e).__name__})") from None
        if str(d.get("format", "")) != PREDICTOR_FORMAT or int(d.get("version", -1)) != PREDICTOR_VERSION:
            raise ValueError(f"expert predictor {path} is not a {PREDICTOR_FORMAT!r} file of version {PREDICTOR_VERSION}")
        try:
            return cls(d["w"], d["b"], int(d["num_experts"]), int(d["top_k"]), int(d["lookahead"]))
        except KeyError as e:
            raise ValueError(f"expert predictor {path} lacks the field {e.args[0]!r}") from None


def learned_prefetch(predictor: LearnedPredictor, trace: RoutingTrace):
    """A `jmoe.infer.cachesim` prefetcher replaying `predictor` on `trace`: before token t
    reaches MoE layer j, the experts predicted from what is known at layer j - lookahead."""
    prev = _previous_token(trace.seq_ids)
    ids = trace.expert_ids
    prev_ids = np.where(prev[:, None, None] >= 0, ids[np.maximum(prev, 0)], -1)
    guesses = {j: predictor.predict(j, ids, prev_ids) for j in range(predictor.lookahead, trace.num_layers)}

    def prefetch(layer: int, t: int) -> list[int]:
        g = guesses.get(layer)
        return [] if g is None else g[t].tolist()

    return prefetch


def gate_prefetch(trace: RoutingTrace):
    """A `jmoe.infer.cachesim` prefetcher replaying the trace's recorded gate guesses."""
    if trace.gate_ids is None:
        raise ValueError("the trace has no gate_ids (record it with the inference engine: jmoe trace)")
    gates = trace.gate_ids

    def prefetch(layer: int, t: int) -> list[int]:
        row = gates[t, layer]
        return row[row >= 0].tolist()

    return prefetch
