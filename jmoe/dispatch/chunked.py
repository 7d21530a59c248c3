"""Fused dropless expert computation in row chunks: the XLA implementation for CPU.

The T*k token-slots are sorted by expert (`sort_slots`). One `lax.while_loop` walks the
experts in order and, within each expert's group, takes chunks of at most `block_size`
rows. Each chunk gathers its tokens, runs the expert function, and adds the weighted
result into the output; the chunk's row count is picked from a small static set
(`chunk_sizes`: multiples of `block_size // 16`, at least 8), so an expert of n slots
wastes fewer than `block_size // 16` rows instead of padding to a whole block. Blocks
under 128 rows (the inference engine's decoding steps, `jmoe.infer.forward.serving_block_size`)
also get chunks of 1, 2 and 4 rows: a decoding step leaves most experts one or two slots,
which an 8-row chunk would pad four- to eightfold. Experts with no slots are skipped.

Nothing of size `[T*k, d]` or `[T*k, f]` is ever materialised: memory stays O(T d + block
rows), and the backward pass recomputes each chunk's forward (a custom VJP) instead of
storing activations. On XLA:CPU this runs at about the speed of a dense FFN with the same
useful FLOPs (see experiments/bench_moe_layer.py), where `jax.lax.ragged_dot` computes
every group densely.

The combine is a row scatter-add into `[T, d]`, done sequentially inside the loop, so it
is deterministic.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.dispatch.sorting import group_offsets
from jmoe.experts import ExpertList

ExpertFn = Callable[[Any, jax.Array], jax.Array]  # (params of one expert, x [n, d]) -> [n, d_out]


SMALL_CHUNKS_BELOW = 128
"""Blocks smaller than this also get chunks of 1, 2 and 4 rows (see `chunk_sizes`)."""


def chunk_sizes(block_size: int) -> tuple[int, ...]:
    """Ascending static chunk row counts: multiples of max(8, block_size // 16) up to
    block_size, preceded by 1, 2 and 4 when block_size < SMALL_CHUNKS_BELOW.

    The small chunks serve decoding steps, where most experts get one or two slots. Measured
    by experiments/bench_decode_moe.py (XLA:CPU, 2 shared cores, d_model 512, forward at the
    engine's block size, against multiples of 8 only): E=64, k=6, d_ff=160 takes 0.69-0.79x
    the time at T = 1, 2, 4, 8 tokens; E=8, k=2, d_ff=1152 0.76-0.83x at T = 1, 2, 4, and
    between 0.71x and 1.11x at T = 8 over three runs (noise on a loaded machine). Training
    blocks (512 rows by default) keep the multiples of 32 only: the small chunks made a
    forward + backward at block_size 512 1.13-1.18x slower (E=8, k=2, 4096 tokens and E=64,
    k=6, 2048 tokens).
    """
    step = min(block_size, max(8, block_size // 16))
    sizes = list(range(step, block_size + 1, step))
    if sizes[-1] != block_size:
        sizes.append(block_size)
    if block_size < SMALL_CHUNKS_BELOW:
        sizes = [s for s in (1, 2, 4) if s < sizes[0]] + sizes
    return tuple(sizes)


def split_chunk_sizes(block_size: int) -> tuple[int, ...]:
    """Chunk row counts for experts in the `ExpertList` layout: the powers of two from
    max(1, block_size // 16) up to block_size (block_size itself a power of two).

    Every chunk size is compiled once per expert (a `lax.switch` over the experts inside the
    switch over sizes), so this ladder is short: at most five sizes. Its chunks pad an
    expert's last rows to at most twice their number.
    """
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two for the ExpertList layout, got {block_size}")
    return tuple(1 << i for i in range(max(1, block_size // 16).bit_length() - 1, block_size.bit_length()))


def _chunk_loop(group_sizes, order, block_size, branch, out_shapes, write, carry, sizes=None):
    """Run `branch(size, e, slots, valid)` on every chunk and fold it into `carry`.

    branch returns fixed-shape outputs (`out_shapes`, padded to block_size rows) so that
    `write(carry, e, slots, valid, outs)` runs outside the `lax.switch` and updates the
    carry in place.
    """
    E = group_sizes.shape[0]
    B = block_size
    sizes = chunk_sizes(B) if sizes is None else sizes
    sizes_arr = jnp.asarray(sizes, jnp.int32)
    order_padded = jnp.concatenate([order, jnp.zeros((B,), order.dtype)])
    offsets = group_offsets(group_sizes)
    # next_expert[e]: the first expert >= e with slots (E if none), so the loop never visits an
    # empty expert (with few tokens, e.g. a decoding step, most experts are empty)
    with_slots = jnp.where(group_sizes > 0, jnp.arange(E, dtype=jnp.int32), E)
    next_expert = jnp.concatenate([lax.cummin(with_slots, reverse=True), jnp.full((1,), E, jnp.int32)])

    def empty(e, slots, valid):
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shapes)

    branches = [empty] + [partial(branch, size) for size in sizes]

    def body(state):
        e, done_rows, carry = state
        n = group_sizes[e]
        remaining = n - done_rows
        index = jnp.where(
            remaining <= 0, 0, jnp.minimum(1 + jnp.sum(sizes_arr < remaining), len(sizes))
        )
        slots = lax.dynamic_slice_in_dim(order_padded, offsets[e] + done_rows, B)
        valid = jnp.arange(B) < remaining
        outs = lax.switch(index, branches, e, slots, valid)
        carry = write(carry, e, slots, valid, outs)
        next_rows = done_rows + B
        finished = next_rows >= n
        return (
            jnp.where(finished, next_expert[e + 1], e),
            jnp.where(finished, 0, next_rows),
            carry,
        )

    init = (next_expert[0], jnp.int32(0), carry)
    return lax.while_loop(lambda s: s[0] < E, body, init)[2]


def _expert_slice(params, e):
    return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, e, keepdims=False), params)


def _run_expert(expert_fn, params, e, x):
    """expert_fn on expert e's weights: a slice of stacked params, or for an `ExpertList` the
    e-th of its arrays picked by `lax.switch` (no copy of the weights).

    Unrolling the experts of an `ExpertList` instead (each expert's chunk in its own switch
    over sizes, no dynamic expert switch, no loop) was measured against this at decoding
    sizes (d=512, T = 1, 2, 4, 8): 0.82x the time for E=8, k=2 at T=8, but 0.96-1.06x at
    T <= 4 and 1.05-1.20x for E=16 and E=64, where the loop's skip of empty experts pays;
    it was not kept."""
    if isinstance(params, ExpertList):
        return lax.switch(e, [partial(expert_fn, p) for p in params.experts], x)
    return expert_fn(_expert_slice(params, e), x)


def _layout(params, num_tokens: int, block_size: int):
    """(block size, chunk sizes) of the loop: the block and `chunk_sizes` for stacked params;
    for an `ExpertList`, the largest power of two within the block and within T rounded up
    to a power of two (the rows an expert gets when each token picks it at most once; more,
    e.g. through an expert map, take more chunks), and `split_chunk_sizes`."""
    if not isinstance(params, ExpertList):
        return block_size, None
    B = min(1 << (max(1, num_tokens) - 1).bit_length(), 1 << (block_size.bit_length() - 1))
    return B, split_chunk_sizes(B)


def _pad_rows(a, rows):
    pad = [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1)
    return jnp.pad(a, pad)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def chunked_expert_combine(
    x: jax.Array,
    slot_weights: jax.Array,
    order: jax.Array,
    group_sizes: jax.Array,
    expert_params: Any,
    expert_fn: ExpertFn,
    top_k: int,
    block_size: int,
) -> jax.Array:
    """Dropless MoE combine: y[t] = sum_j w[t, j] * expert_fn(params[e_tj], x[t]).

    Args:
      x: [T, d] tokens.
      slot_weights: [T*k] combine weight of each slot (slot s is token s // k).
      order: [T*k] int32 slots sorted by expert (from `sort_slots`).
      group_sizes: [E] int32 slots per expert; slots past sum(group_sizes) are skipped.
      expert_params: pytree of `[E, ...]` stacked expert parameters, or an `ExpertList`.
      expert_fn: (params of one expert, [n, d]) -> [n, d_out] (d_out is d for an FFN expert).
      top_k: k.
      block_size: maximum rows per chunk.
    Returns:
      [T, d_out] in x's dtype (accumulated in float32).
    """
    return _forward(x, slot_weights, order, group_sizes, expert_params, expert_fn, top_k, block_size)[0]


def _output_width(expert_fn, params, x) -> int:
    one = params.experts[0] if isinstance(params, ExpertList) else jax.tree.map(lambda a: a[0], params)
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    return jax.eval_shape(expert_fn, jax.tree.map(spec, one), jax.ShapeDtypeStruct((1, x.shape[1]), x.dtype)).shape[-1]


def _forward(x, slot_weights, order, group_sizes, params, expert_fn, top_k, block_size):
    T = x.shape[0]
    d = _output_width(expert_fn, params, x)
    B, sizes = _layout(params, T, block_size)

    def branch(size, e, slots, valid):
        rows = slots[:size]
        xc = jnp.where(valid[:size, None], jnp.take(x, rows // top_k, axis=0), 0)
        yc = _run_expert(expert_fn, params, e, xc)
        return _pad_rows(yc.astype(jnp.float32), B)

    def write(out, e, slots, valid, yc):
        w = jnp.take(slot_weights, slots).astype(jnp.float32)
        contrib = jnp.where(valid[:, None], yc * w[:, None], 0.0)
        return out.at[slots // top_k].add(contrib, mode="promise_in_bounds")

    out_shapes = jax.ShapeDtypeStruct((B, d), jnp.float32)
    out = _chunk_loop(group_sizes, order, B, branch, out_shapes, write, jnp.zeros((T, d), jnp.float32), sizes)
    return out.astype(x.dtype), (x, slot_weights, order, group_sizes, params)


def _backward(expert_fn, top_k, block_size, res, dout):
    x, slot_weights, order, group_sizes, params = res
    if isinstance(params, ExpertList):  # gradients of the serving layout: through the stacked one
        dx, dws, _, _, dstacked = _backward(expert_fn, top_k, block_size, (*res[:4], params.stack()), dout)
        return dx, dws, None, None, ExpertList.split(dstacked)
    T, d = x.shape  # the input width (dout is [T, d_out])
    N = order.shape[0]
    B = block_size
    dout = dout.astype(jnp.float32)

    def branch(size, e, slots, valid):
        rows = slots[:size]
        v = valid[:size]
        tok = rows // top_k
        xc = jnp.where(v[:, None], jnp.take(x, tok, axis=0), 0)
        w = jnp.where(v, jnp.take(slot_weights, rows), 0).astype(jnp.float32)
        dy = jnp.take(dout, tok, axis=0)
        yc, vjp = jax.vjp(expert_fn, _expert_slice(params, e), xc)
        dw = jnp.where(v, jnp.sum(yc.astype(jnp.float32) * dy, axis=-1), 0.0)
        dpe, dxc = vjp((dy * w[:, None]).astype(yc.dtype))
        dpe = jax.tree.map(lambda g: g.astype(jnp.float32), dpe)
        return _pad_rows(dxc.astype(jnp.float32), B), _pad_rows(dw, B), dpe

    def write(acc, e, slots, valid, outs):
        dx, dws, dparams = acc
        dxc, dw, dpe = outs
        dx = dx.at[slots // top_k].add(jnp.where(valid[:, None], dxc, 0.0), mode="promise_in_bounds")
        dws = dws.at[slots].add(jnp.where(valid, dw, 0.0), mode="promise_in_bounds")
        dparams = jax.tree.map(
            lambda acc_p, g: lax.dynamic_update_index_in_dim(
                acc_p, lax.dynamic_index_in_dim(acc_p, e, keepdims=False) + g, e, 0
            ),
            dparams,
            dpe,
        )
        return dx, dws, dparams

    param_grad_shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape[1:], jnp.float32), params)
    out_shapes = (
        jax.ShapeDtypeStruct((B, d), jnp.float32),
        jax.ShapeDtypeStruct((B,), jnp.float32),
        param_grad_shapes,
    )
    acc = (
        jnp.zeros((T, d), jnp.float32),
        jnp.zeros((N,), jnp.float32),
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
    )
    dx, dws, dparams = _chunk_loop(group_sizes, order, B, branch, out_shapes, write, acc)
    dparams = jax.tree.map(lambda g, p: g.astype(p.dtype), dparams, params)
    return dx.astype(x.dtype), dws.astype(slot_weights.dtype), None, None, dparams


chunked_expert_combine.defvjp(_forward, _backward)
