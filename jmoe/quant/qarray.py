"""Group-wise quantized weights: a pytree that stands in for a float weight matrix.

A weight `w [..., a, b]` (used as `x @ w`, so `a` is the contraction axis) is cut into groups
of `group_size` consecutive rows of `a` per column of `b`; each group has a float scale and a
float zero point, and its values are b-bit codes in [0, 2^bits - 1]:

    w ~ (code - zero) * scale

The codes are bit-packed along the last axis (8 codes in `bits` bytes), so the stored bytes are
exactly `nbytes`: bits/8 per weight plus the scales and zero points. Any leading axes (the
expert axis of stacked expert weights) are kept on every leaf, so slicing a `QuantizedArray`
with `jax.tree.map` slices one expert's codes, scales and zero points together: the dropless
loop takes one expert's weights per chunk and dequantizes only those (`dense`).

Float zero points (not integers) are what the HQQ refinement optimises and what MC-MoE's
quantizer uses, so they are kept in float here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jmoe.checks import check_int, is_int

BITS = (1, 2, 3, 4, 8)


def check_bits(bits: int, what: str = "bits") -> int:
    """bits, or a ValueError naming `what` unless it is one of `BITS` (an integer)."""
    if not is_int(bits) or bits not in BITS:
        raise ValueError(f"{what}={bits!r} is not supported; supported: {', '.join(map(str, BITS))}")
    return int(bits)


def check_weight(w, group_size: int, what: str = "w") -> None:
    """A ValueError naming `what` unless w is a floating [..., a, b] array whose contraction
    axis a the integer group_size >= 1 divides."""
    check_int(group_size, "group_size")
    shape = tuple(getattr(w, "shape", ()))
    if len(shape) < 2:
        raise ValueError(f"{what} must be a [..., a, b] weight matrix, got shape {shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{what} must be a floating-point weight, got dtype {w.dtype}")
    if shape[-2] % group_size:
        raise ValueError(f"group_size={group_size} does not divide the contraction axis of {what} {shape}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """Codes, scales and zero points of a group-wise quantized `[..., a, b]` weight.

    packed: [..., a, b * bits / 8] uint8, the codes bit-packed along the last axis.
    scale, zero: [..., a / group_size, b] float (the weight's dtype).
    bits, group_size: static.
    """

    packed: jax.Array
    scale: jax.Array
    zero: jax.Array
    bits: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, a, packed_b = self.packed.shape
        return (*lead, a, packed_b * 8 // self.bits)

    @property
    def ndim(self) -> int:
        return self.packed.ndim

    @property
    def dtype(self):
        return self.scale.dtype

    @property
    def nbytes(self) -> int:
        """Stored bytes: packed codes, scales and zero points."""
        return int(self.packed.size * self.packed.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize
                   + self.zero.size * self.zero.dtype.itemsize)

    def codes(self) -> jax.Array:
        """[..., a, b] uint8 codes."""
        return unpack(self.packed, self.bits)

    def dequantize(self, dtype=None) -> jax.Array:
        """The float weight `(code - zero) * scale`, `[..., a, b]` in `dtype` (default: the
        scales' dtype)."""
        dtype = self.scale.dtype if dtype is None else jnp.dtype(dtype)
        *lead, a, b = self.shape
        g = self.group_size
        q = self.codes().astype(jnp.float32).reshape(*lead, a // g, g, b)
        w = (q - self.zero.astype(jnp.float32)[..., None, :]) * self.scale.astype(jnp.float32)[..., None, :]
        return w.reshape(*lead, a, b).astype(dtype)

    def astype(self, dtype) -> jax.Array:
        """Dequantized to `dtype`, so that code written for float weights (`w.astype(dt)`)
        runs on quantized ones."""
        return self.dequantize(dtype)

    def __repr__(self) -> str:
        return f"QuantizedArray(shape={self.shape}, bits={self.bits}, group_size={self.group_size}, dtype={self.dtype})"


def dense(w, dtype=None) -> jax.Array:
    """A weight as a float array: dequantized if quantized, else cast."""
    if isinstance(w, QuantizedArray):
        return w.dequantize(dtype)
    return w if dtype is None else w.astype(dtype)


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """[..., n] codes < 2^bits -> [..., n * bits / 8] uint8 (n a multiple of 8)."""
    check_bits(bits)
    codes = jnp.asarray(codes).astype(jnp.uint32)
    *lead, n = codes.shape
    if n % 8:
        raise ValueError(f"packing needs a last axis that is a multiple of 8, got {n}")
    if bits == 8:
        return codes.astype(jnp.uint8)
    words = codes.reshape(*lead, n // 8, 8)
    word = jnp.zeros(words.shape[:-1], jnp.uint32)
    for i in range(8):  # 8 codes of `bits` bits in one uint32 (8 * bits <= 32)
        word = word | (words[..., i] << (bits * i))
    out = jnp.stack([(word >> (8 * j)) & 0xFF for j in range(bits)], axis=-1)
    return out.astype(jnp.uint8).reshape(*lead, n * bits // 8)


def unpack(packed: jax.Array, bits: int) -> jax.Array:
    """The inverse of `pack`: [..., m] uint8 -> [..., m * 8 / bits] uint8 codes."""
    if bits == 8:
        return packed
    *lead, m = packed.shape
    chunks = packed.astype(jnp.uint32).reshape(*lead, m // bits, bits)
    word = jnp.zeros(chunks.shape[:-1], jnp.uint32)
    for j in range(bits):
        word = word | (chunks[..., j] << (8 * j))
    mask = (1 << bits) - 1
    codes = jnp.stack([(word >> (bits * i)) & mask for i in range(8)], axis=-1)
    return codes.astype(jnp.uint8).reshape(*lead, m * 8 // bits)


def group_view(w: jax.Array, group_size: int) -> jax.Array:
    """[..., a, b] -> [..., a / g, g, b]."""
    *lead, a, b = w.shape
    if group_size < 1 or a % group_size:
        raise ValueError(f"group_size={group_size} must divide the contraction axis of a {tuple(w.shape)} weight")
    return w.reshape(*lead, a // group_size, group_size, b)


def minmax_params(w: jax.Array, bits: int, group_size: int) -> tuple[jax.Array, jax.Array]:
    """Round-to-nearest parameters of every group: (scale, zero) `[..., a/g, b]` from the
    group's min and max (asymmetric; zero a float)."""
    wg = group_view(w.astype(jnp.float32), group_size)
    lo, hi = wg.min(axis=-2), wg.max(axis=-2)
    levels = (1 << bits) - 1
    scale = (hi - lo) / levels
    scale = jnp.where(scale > 0, scale, 1.0)  # a constant group: any scale, zero puts it on a level
    zero = -lo / scale
    return scale, zero


def quantize_codes(w: jax.Array, scale: jax.Array, zero: jax.Array, bits: int, group_size: int) -> jax.Array:
    """[..., a, b] codes of w under the group parameters (round to nearest, clipped)."""
    wg = group_view(w.astype(jnp.float32), group_size)
    q = jnp.round(wg / scale[..., None, :] + zero[..., None, :])
    return jnp.clip(q, 0, (1 << bits) - 1).astype(jnp.uint8).reshape(w.shape)


def from_params(w: jax.Array, scale: jax.Array, zero: jax.Array, bits: int, group_size: int) -> QuantizedArray:
    """w quantized with given group parameters (scale, zero `[..., a/g, b]`), stored in w's dtype."""
    codes = quantize_codes(w, scale, zero, bits, group_size)
    dt = w.dtype
    return QuantizedArray(pack(codes, bits), scale.astype(dt), zero.astype(dt), bits, group_size)


def quantize_rtn(w: jax.Array, bits: int, group_size: int = 128) -> QuantizedArray:
    """Round-to-nearest group quantization of `w [..., a, b]` (asymmetric, float zero points)."""
    check_bits(bits)
    check_weight(w, group_size)
    scale, zero = minmax_params(w, bits, group_size)
    return from_params(w, scale, zero, bits, group_size)
