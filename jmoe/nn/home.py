"""HoME, a hierarchy of multi-gate experts for multi-task models (Wang et al., "HoME: Hierarchy
of Multi-Gate Experts for Multi-Task Learning at Kuaishou", 2024), and MMoE, the flat model
it fixes, as pure functions over one input per example (e.g. a token's hidden state) and its
task id.

MMoE (`hierarchy=False`): E experts read x; task t mixes all of them with its own softmax
gate and a tower: o_t = tower_t(sum_e softmax(x G_t)_e E_e(x)).

HoME adds the paper's fixes:
  expert normalisation and Swish   E(x) = silu(norm(x W + b)) instead of relu(x W + b): no
                                   expert whose outputs collapse to zero (`activation`,
                                   `expert_norm`; LayerNorm for the paper's BatchNorm, so that
                                   a token's output does not depend on its batch);
  a hierarchy mask                 two levels. The meta level has global shared experts and
                                   per-category experts (tasks are grouped in categories);
                                   category c's gate mixes the shared and its own experts
                                   into z_c, a shared gate mixes all of them into z_s. The
                                   task level has shared, category and task experts reading
                                   z_s, z_c and z_c; task t's gate mixes the shared, its
                                   category's and its own (`hierarchy`);
  feature gates                    each expert reads its input times 2 sigmoid(v B_i A_i), a
                                   low-rank gate of its own (`feature_gate_rank`, 0 = off;
                                   B is zero at the start, so every gate starts at 1);
  self gates                       task t's output adds its own experts once more, weighted
                                   by a gate of their own (sigmoid for one expert, softmax
                                   for several): a residual path past the mixing gate
                                   (`self_gate`).

Every task's tower is a linear map from the expert width to `d_out`. `home_apply` returns,
for each example, the output of its own task, and statistics of the experts (the share of
expert units that are zero, the mean gate weight per expert and task).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jmoe.options import Options, option


@dataclasses.dataclass(frozen=True)
class HoMEConfig(Options):
    """Sizes and switches of a HoME (or, with hierarchy=False, MMoE) multi-task layer."""

    categories: tuple = option((0,), doc="the category of each task (task t belongs to categories[t])")
    d_in: int = option(128, ge=1, doc="input width")
    d_out: int = option(128, ge=1, doc="output width of every task's tower")
    hidden: int = option(128, ge=1, doc="expert output width")
    shared_experts: int = option(1, ge=1, doc="global shared experts per level")
    category_experts: int = option(1, ge=0, doc="experts per category per level")
    task_experts: int = option(1, ge=0, doc="experts per task (task level)")
    hierarchy: bool = option(True, doc="two levels with the hierarchy mask; false: one level, every gate over "
                                       "every expert (MMoE)")
    expert_norm: bool = option(True, doc="normalise each expert's pre-activation (LayerNorm)")
    activation: str = option("silu", choices=("silu", "relu"))
    feature_gate_rank: int = option(16, ge=0, doc="rank of each expert's feature gate; 0 = no feature gates")
    self_gate: bool = option(True, doc="add each task's own experts past the mixing gate")

    @classmethod
    def owner(cls) -> str:
        return "home"

    def __post_init__(self):
        super().__post_init__()
        cats = self.categories
        if not cats or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in cats):
            raise ValueError(f"HoMEConfig.categories={cats!r} must be a non-empty list of category indices >= 0")
        if sorted(set(cats)) != list(range(max(cats) + 1)):
            raise ValueError(f"HoMEConfig.categories={cats!r} must use every category index from 0 to its largest")
        if self.self_gate and not self.task_experts:
            raise ValueError("HoMEConfig.self_gate needs task_experts >= 1")

    @property
    def num_tasks(self) -> int:
        return len(self.categories)

    @property
    def num_categories(self) -> int:
        return max(self.categories) + 1

    @classmethod
    def mmoe(cls, categories, d_in: int, d_out: int, hidden: int, num_experts: int) -> "HoMEConfig":
        """MMoE with num_experts ReLU experts (no normalisation, feature or self gates)."""
        return cls(categories=tuple(categories), d_in=d_in, d_out=d_out, hidden=hidden, shared_experts=num_experts,
                   category_experts=0, task_experts=0, hierarchy=False, expert_norm=False, activation="relu",
                   feature_gate_rank=0, self_gate=False)


# ------------------------------------------------------------------ parameters


def _dense(key, n_in, n_out, scale=None):
    std = (1.0 / n_in) ** 0.5 if scale is None else scale
    return {"w": std * jax.random.normal(key, (n_in, n_out), jnp.float32), "b": jnp.zeros((n_out,), jnp.float32)}


def _init_experts(key, n: int, d_in: int, cfg: HoMEConfig) -> dict:
    """n experts stacked on a leading axis: w [n, d_in, h], b [n, h] (+ norm, feature gate)."""
    k_w, k_a = jax.random.split(key)
    p = {"w": jax.random.normal(k_w, (n, d_in, cfg.hidden), jnp.float32) / math.sqrt(d_in),
         "b": jnp.zeros((n, cfg.hidden), jnp.float32)}
    if cfg.expert_norm:
        p["norm_scale"], p["norm_bias"] = jnp.ones((n, cfg.hidden), jnp.float32), jnp.zeros((n, cfg.hidden), jnp.float32)
    if cfg.feature_gate_rank:
        r = cfg.feature_gate_rank
        p["fg_a"] = jax.random.normal(k_a, (n, d_in, r), jnp.float32) / math.sqrt(d_in)
        p["fg_b"] = jnp.zeros((n, r, d_in), jnp.float32)
    return p


def _level_counts(cfg: HoMEConfig, level: str) -> dict:
    if level == "meta":
        return {"shared": cfg.shared_experts, "category": cfg.category_experts}
    return {"shared": cfg.shared_experts, "category": cfg.category_experts, "task": cfg.task_experts}


def gate_width(cfg: HoMEConfig) -> int:
    """Experts each task-level gate mixes: shared + its category's + its own (all, for MMoE)."""
    if not cfg.hierarchy:
        return cfg.shared_experts
    return cfg.shared_experts + cfg.category_experts + cfg.task_experts


def init_home(key: jax.Array, cfg: HoMEConfig) -> dict:
    """Parameters (float32):

      MMoE:  experts (shared_experts of them), gates {"task": w [T, d_in, E]}, towers
      HoME:  meta {"shared", "category" [C * n_c]} experts, meta gates {"category" [C, d_in,
             n_s + n_c], "shared" [d_in, n_s + C n_c]}; task {"shared", "category" [C * n_c],
             "task" [T * n_t]} experts, task gates [T, h, n_s + n_c + n_t], self gates
             [T, h, n_t]; towers {"w": [T, h, d_out], "b": [T, d_out]}
    """
    if not isinstance(cfg, HoMEConfig):
        raise ValueError(f"cfg must be a HoMEConfig, got {type(cfg).__name__}")
    T, C, h = cfg.num_tasks, cfg.num_categories, cfg.hidden
    ks = iter(jax.random.split(key, 16))
    towers = {"w": jax.random.normal(next(ks), (T, h, cfg.d_out), jnp.float32) / math.sqrt(h),
              "b": jnp.zeros((T, cfg.d_out), jnp.float32)}
    gate = lambda k, *shape: 0.01 * jax.random.normal(k, shape, jnp.float32)  # noqa: E731
    if not cfg.hierarchy:
        return {"experts": _init_experts(next(ks), cfg.shared_experts, cfg.d_in, cfg),
                "gates": {"task": gate(next(ks), T, cfg.d_in, cfg.shared_experts)}, "towers": towers}
    ns, nc, nt = cfg.shared_experts, cfg.category_experts, cfg.task_experts
    meta = {"shared": _init_experts(next(ks), ns, cfg.d_in, cfg)}
    task = {"shared": _init_experts(next(ks), ns, h, cfg)}
    if nc:
        meta["category"] = _init_experts(next(ks), C * nc, cfg.d_in, cfg)
        task["category"] = _init_experts(next(ks), C * nc, h, cfg)
    if nt:
        task["task"] = _init_experts(next(ks), T * nt, h, cfg)
    params = {"meta": meta, "task": task, "towers": towers,
              "gates": {"meta_category": gate(next(ks), C, cfg.d_in, ns + nc),
                        "meta_shared": gate(next(ks), cfg.d_in, ns + C * nc),
                        "task": gate(next(ks), T, h, gate_width(cfg))}}
    if cfg.self_gate:
        params["gates"]["self"] = gate(next(ks), T, h, nt)
    return params


# ------------------------------------------------------------------ apply


def experts_apply(p: dict, x: jax.Array, cfg: HoMEConfig) -> jax.Array:
    """Every expert of a stack on every input: x [N, d] (or [n, N, d], one input per expert)
    -> [n, N, h] float32."""
    n = p["w"].shape[0]
    xs = jnp.broadcast_to(x, (n,) + x.shape) if x.ndim == 2 else x
    if cfg.feature_gate_rank:  # x * 2 sigmoid(x A B), per expert
        fg = 2.0 * jax.nn.sigmoid(jnp.einsum("nbr,nrd->nbd", jnp.einsum("nbd,ndr->nbr", xs, p["fg_a"]), p["fg_b"]))
        xs = xs * fg
    z = jnp.einsum("nbd,ndh->nbh", xs, p["w"]) + p["b"][:, None]
    if cfg.expert_norm:
        mu = jnp.mean(z, axis=-1, keepdims=True)
        var = jnp.var(z, axis=-1, keepdims=True)
        z = (z - mu) * jax.lax.rsqrt(var + 1e-5) * p["norm_scale"][:, None] + p["norm_bias"][:, None]
    return jax.nn.silu(z) if cfg.activation == "silu" else jax.nn.relu(z)


def _mix(weights: jax.Array, outs: jax.Array) -> jax.Array:
    """weights [N, n], outs [n, N, h] -> [N, h]."""
    return jnp.einsum("bn,nbh->bh", weights, outs)


class _ZeroCount:
    """Counts expert output units that are exactly 0 over the experts passed through it."""

    def __init__(self):
        self.zero, self.units = 0.0, 0

    def __call__(self, outs: jax.Array) -> jax.Array:
        self.zero = self.zero + jnp.sum(outs == 0.0)
        self.units += outs.size
        return outs

    @property
    def share(self):
        return self.zero / max(self.units, 1)


def _rows(p: dict, lo: int, hi: int) -> dict:
    """Experts lo..hi-1 of a stack."""
    return jax.tree.map(lambda a: a[lo:hi], p)


def _task_outputs(params: dict, x: jax.Array, cfg: HoMEConfig, tasks: tuple[int, ...]):
    """The mixed expert outputs of `tasks` (before their towers) on every input, computing
    only the experts those tasks read: ([len(tasks), N, h], their gate weights
    [len(tasks), N, gate_width], a `_ZeroCount` of the experts run)."""
    count = _ZeroCount()
    g = params["gates"]
    if not cfg.hierarchy:
        outs = count(experts_apply(params["experts"], x, cfg))  # [E, N, h]
        weights = jax.nn.softmax(jnp.einsum("bd,tde->tbe", x, g["task"][jnp.asarray(tasks)]), axis=-1)
        return jnp.einsum("tbn,nbh->tbh", weights, outs), weights, count
    ns, nc, nt = cfg.shared_experts, cfg.category_experts, cfg.task_experts
    empty = jnp.zeros((0, x.shape[0], cfg.hidden), jnp.float32)
    # meta level: z_s mixes every meta expert; z_c its category's and the shared ones
    shared = count(experts_apply(params["meta"]["shared"], x, cfg))  # [ns, N, h]
    cat = count(experts_apply(params["meta"]["category"], x, cfg)) if nc else empty  # [C nc, N, h]
    z_s = _mix(jax.nn.softmax(x @ g["meta_shared"], axis=-1), jnp.concatenate([shared, cat]))
    # task level: shared experts read z_s; a category's experts and its tasks' experts read z_c
    t_shared = count(experts_apply(params["task"]["shared"], z_s, cfg))
    z_c, t_cat = {}, {}
    for c in sorted({cfg.categories[t] for t in tasks}):
        own = jnp.concatenate([shared, cat[c * nc:(c + 1) * nc]])
        z_c[c] = _mix(jax.nn.softmax(x @ g["meta_category"][c], axis=-1), own)
        t_cat[c] = count(experts_apply(_rows(params["task"]["category"], c * nc, (c + 1) * nc), z_c[c], cfg)) if nc \
            else empty
    per_task, weights = [], []
    for t in tasks:
        c = cfg.categories[t]
        mine = count(experts_apply(_rows(params["task"]["task"], t * nt, (t + 1) * nt), z_c[c], cfg)) if nt else empty
        w = jax.nn.softmax(z_c[c] @ g["task"][t], axis=-1)
        out = _mix(w, jnp.concatenate([t_shared, t_cat[c], mine]))
        if cfg.self_gate:
            logits = z_c[c] @ g["self"][t]
            sw = jax.nn.sigmoid(logits) if nt == 1 else jax.nn.softmax(logits, axis=-1)
            out = out + _mix(sw, mine)
        per_task.append(out)
        weights.append(w)
    return jnp.stack(per_task), jnp.stack(weights), count


def _check_x(x: jax.Array, cfg: HoMEConfig) -> jax.Array:
    if x.ndim != 2 or x.shape[-1] != cfg.d_in:
        raise ValueError(f"x must be [N, d_in={cfg.d_in}], got shape {x.shape}")
    return x.astype(jnp.float32)


def home_apply(params: dict, x: jax.Array, task_ids: jax.Array, cfg: HoMEConfig) -> tuple[jax.Array, dict]:
    """Each example's output from its own task's tower.

    Args:
      x: [N, d_in] inputs; task_ids: [N] int task of each example, in [0, num_tasks).
    Returns:
      y [N, d_out] float32 and stats: "zero_share" [] (share of expert units that are 0 over
      every level), "gates" [T, gate_width] (mean task-level gate weight of each task over its
      examples; NaN for a task without examples).
    """
    x = _check_x(x, cfg)
    if task_ids.shape != x.shape[:1]:
        raise ValueError(f"task_ids must be [N={x.shape[0]}], got shape {task_ids.shape}")
    T = cfg.num_tasks
    one_hot = jax.nn.one_hot(task_ids, T, dtype=jnp.float32)  # [N, T]
    per_task, weights, count = _task_outputs(params, x, cfg, tuple(range(T)))
    towers = params["towers"]
    y_all = jnp.einsum("tbh,tho->tbo", per_task, towers["w"]) + towers["b"][:, None]
    y = jnp.einsum("bt,tbo->bo", one_hot, y_all)
    mean_gates = jnp.einsum("bt,tbn->tn", one_hot, weights) / jnp.sum(one_hot, axis=0)[:, None]
    return y, {"zero_share": count.share, "gates": mean_gates}


def home_task_apply(params: dict, x: jax.Array, task: int, cfg: HoMEConfig) -> jax.Array:
    """Task `task`'s output on every input, x [N, d_in] -> [N, d_out] float32: `home_apply`
    with every example of one task, running only the experts that task reads."""
    x = _check_x(x, cfg)
    if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < cfg.num_tasks:
        raise ValueError(f"task={task!r} must be a task index in [0, {cfg.num_tasks})")
    per_task, _, _ = _task_outputs(params, x, cfg, (task,))
    return per_task[0] @ params["towers"]["w"][task] + params["towers"]["b"][task]
