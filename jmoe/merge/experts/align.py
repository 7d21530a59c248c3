"""Permutation alignment of experts' hidden neurons before merging them.

An expert FFN is invariant to permuting its hidden neurons when w_gate and w_up columns and
w_down rows move together: `permute_expert` does that (one permutation tied across all
three). Two ways to choose the permutation that lines expert b up with expert a:

  weight matching      maximise sum_j <a_in[:, j], b_in[:, p(j)]> + <a_out[j], b_out[p(j)]>
                       over permutations p (Hungarian algorithm), with a_in the stacked gate
                       and up columns and a_out the down rows (git re-basin, MC-SMoE);
  activation matching  maximise the summed Pearson correlation of the two experts' hidden
                       activations on calibration inputs.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from jmoe.experts import ACTIVATIONS


def permute_expert(p: dict, perm: np.ndarray) -> dict:
    """One expert ({"w_gate", "w_up": [d, f], "w_down": [f, d]}) with hidden neurons reordered."""
    out = dict(p)
    for name in ("w_gate", "w_up"):
        if name in p:
            out[name] = np.asarray(p[name])[:, perm]
    out["w_down"] = np.asarray(p["w_down"])[perm, :]
    return out


def _inputs(p: dict) -> np.ndarray:
    return np.concatenate([np.asarray(p[n], np.float64) for n in ("w_gate", "w_up") if n in p], axis=0)  # [(2)d, f]


def weight_matching(reference: dict, other: dict) -> np.ndarray:
    """The permutation p of `other`'s hidden neurons that best matches `reference` by weights."""
    cost = _inputs(reference).T @ _inputs(other) + np.asarray(reference["w_down"], np.float64) @ np.asarray(other["w_down"], np.float64).T
    rows, cols = linear_sum_assignment(cost, maximize=True)
    perm = np.empty_like(cols)
    perm[rows] = cols
    return perm


def hidden_activations(p: dict, x: np.ndarray, activation: str) -> np.ndarray:
    """One expert's hidden activations [N, f] float64 on x [N, d]: act(x w_gate) * (x w_up) for
    gated activations, act(x w_up) otherwise."""
    act = ACTIVATIONS.get(activation)
    x = np.asarray(x, np.float64)
    up = x @ np.asarray(p["w_up"], np.float64)
    if act.gated:
        g = x @ np.asarray(p["w_gate"], np.float64)
        return np.asarray(act.fn(g)) * up
    return np.asarray(act.fn(up))


def activation_matching(reference: dict, other: dict, x: np.ndarray, activation: str = "swiglu") -> np.ndarray:
    """The permutation of `other`'s neurons whose activations on x [N, d] correlate best with
    `reference`'s (identity when there are fewer than 2 inputs)."""
    f = np.asarray(reference["w_down"]).shape[0]
    if x.shape[0] < 2:
        return np.arange(f)
    a = hidden_activations(reference, x, activation)
    b = hidden_activations(other, x, activation)
    a = (a - a.mean(0)) / (a.std(0) + 1e-9)
    b = (b - b.mean(0)) / (b.std(0) + 1e-9)
    corr = a.T @ b / x.shape[0]
    rows, cols = linear_sum_assignment(corr, maximize=True)
    perm = np.empty_like(cols)
    perm[rows] = cols
    return perm
