"""MC-MoE's pre-loading mixed-precision bit allocation (Aaronhuang-778/MC-MoE,
`precision_solver.py`): bit widths per expert from an integer linear program.

Each expert j of a layer has an activation frequency f_j (how many routing slots select it)
and an activation weight w_j (the summed router probability of those slots), both normalised
over the layer, and a quantization loss L_jb per candidate width b (the MoE layer's output
error with expert j alone quantized to b bits). Choosing width b for expert j costs

    c_jb = f_j^alpha * w_j^beta * L_jb^alpha * 1000

and the program picks one width per expert (binary x_jb, sum_b x_jb = 1) minimising sum c_jb x_jb
under the bit budget sum_jb b x_jb <= avg_bits * E, per layer as in the reference code (or over
all layers with `per_layer=False`). The reference also asks for at least one expert at the top
width and one at the middle width (`at_least_one`). The reference's defaults are alpha = 1,
beta = 1.5 and widths (1, 2, 3); its `gama` option is parsed but unused, and the loss shares
alpha's exponent, as here. Solved with scipy's `milp` (HiGHS) instead of Gurobi.
"""

from __future__ import annotations

import numpy as np

from jmoe.quant.qarray import check_bits

ALPHA, BETA, SCALE = 1.0, 1.5, 1000.0


def costs(frequency: np.ndarray, weight: np.ndarray, loss: np.ndarray, *, alpha: float = ALPHA,
          beta: float = BETA) -> np.ndarray:
    """c [L, E, B] from frequency, weight [L, E] (raw; normalised per layer here) and loss [L, E, B]."""
    f = np.asarray(frequency, np.float64)
    w = np.asarray(weight, np.float64)
    loss = np.asarray(loss, np.float64)
    if f.shape != w.shape or loss.shape[:2] != f.shape:
        raise ValueError(f"frequency {f.shape}, weight {w.shape} and loss {loss.shape} must share [layers, experts]")
    f = f / np.maximum(f.sum(-1, keepdims=True), 1e-30)
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-30)
    return (f ** alpha * w ** beta)[..., None] * loss ** alpha * SCALE


def least_average(candidates, num_experts: int, at_least_one: bool = True) -> float:
    """The smallest average width an allocation of `candidates` to `num_experts` experts can
    have (with the reference's at-least-one-expert constraints on the two widest)."""
    cands = sorted(candidates)
    B, E = len(cands), num_experts
    required = [B - 1, B - 2][: min(E, B)] if at_least_one and B > 1 else []
    return (sum(cands[k] for k in required) + (E - len(required)) * cands[0]) / E


def allocate_bits(frequency, weight, loss, avg_bits: float, *, candidates=(1, 2, 3), alpha: float = ALPHA,
                  beta: float = BETA, per_layer: bool = True, at_least_one: bool = True) -> np.ndarray:
    """Bit width per expert [L, E] (ints from `candidates`) minimising the summed cost under an
    average of at most `avg_bits` bits per expert. ValueError when no allocation meets it."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    cands = np.asarray(sorted(check_bits(int(b), "candidates") for b in candidates), np.float64)
    c = costs(frequency, weight, loss, alpha=alpha, beta=beta)
    L, E, B = c.shape
    if B != len(cands):
        raise ValueError(f"loss has {B} widths per expert, candidates has {len(cands)}")
    required = [B - 1, B - 2][: min(E, B)] if at_least_one and B > 1 else []  # widths that need an expert
    least = least_average(cands, E, at_least_one)
    if avg_bits < least - 1e-9:
        raise ValueError(f"avg_bits={avg_bits}: no allocation of widths {tuple(int(b) for b in cands)} to {E} experts "
                         f"meets it (the least is {least:g})")
    groups = [list(range(L))] if not per_layer else [[layer] for layer in range(L)]
    out = np.zeros((L, E), np.int64)
    for layers in groups:
        n = len(layers) * E
        cost = c[layers].reshape(n * B)
        one = np.kron(np.eye(n), np.ones(B))  # one width per expert
        rows, lo, hi = [one], [np.ones(n)], [np.ones(n)]
        rows.append(np.tile(cands, n)[None])  # the bit budget
        lo.append([-np.inf])
        hi.append([avg_bits * n])
        for k in required:
            for layer_i in range(len(layers)):
                sel = np.zeros(n * B)
                sel[layer_i * E * B + k: (layer_i + 1) * E * B: B] = 1
                rows.append(sel[None])
                lo.append([1])
                hi.append([np.inf])
        res = milp(cost, constraints=LinearConstraint(np.vstack(rows), np.concatenate(lo), np.concatenate(hi)),
                   integrality=np.ones(n * B), bounds=Bounds(0, 1))
        if not res.success:
            raise ValueError(f"avg_bits={avg_bits}: the bit allocation has no solution ({res.message})")
        choice = np.round(res.x).reshape(len(layers), E, B).argmax(-1)
        out[layers] = cands[choice].astype(np.int64)
    return out
