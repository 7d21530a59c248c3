"""The table of compress methods: `compress_run` and `jmoe compress --method` read it, and every
method registers itself once, next to its code.

A method reduces the experts of every MoE layer of a jmoe language model:

    reduce(params, cfg, stats, target_experts, *, align, router, calib, seed)
        -> (params, cfg, mapping, report)

stats: routing statistics (`collect_routing_stats`); calib: {layer: {expert: inputs}} for
activation alignment (None unless `align="activation"` and the method merges). mapping:
{layer: ("keep", kept indices) | ("groups", labels)} for carrying the router state over
(empty where the router keeps its outputs); report: what the run's report.json records about
the reduction ({"kept": ...} or {"groups": ...}).

Everything a compression is asked is checked before any work: `check_options` the options
(ranges, and options that do not apply to the method), `check_target_experts` and the
method's own `check` against the model's configuration (config.json, read without loading
the model).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable

from jmoe.checks import is_int
from jmoe.merge.registry import MethodTable


@dataclasses.dataclass(frozen=True)
class CompressMethod:
    """One row of the compress-method table.

    name: `--method` / `compress_run(method=...)`. reduce: see the module docstring.
    merges: it groups experts and merges them (the `router` option applies, and activation
    alignment collects expert inputs). aligns: neuron alignment (`align`) applies. low_rank:
    after reducing, every expert weight becomes low rank + sparse residual (MC-SMoE; takes
    `rank` and one of `sparsity` or `budget`). doc: one line for `--help`. check:
    check(cfg, target_experts, source) raises a one-line ValueError when the method cannot
    reduce the model of `cfg` to `target_experts` (it reads the configuration only; source
    names the model in the message).
    """

    name: str
    reduce: Callable[..., tuple[dict, Any, dict, dict]]
    merges: bool = True
    aligns: bool = False
    low_rank: bool = False
    doc: str = ""
    check: Callable[[Any, float, str], None] | None = None


ROUTER_MODES = ("share", "merge")
ALIGNMENTS = ("weight", "activation", "none")
IMPORTANCES = ("magnitude", "sensitivity")


COMPRESS_METHODS: MethodTable[CompressMethod] = MethodTable("compress method")


def register_compress_method(method: CompressMethod) -> CompressMethod:
    """Add `method` to `COMPRESS_METHODS` (`COMPRESS_METHODS.remove(name)` takes it out)."""
    if not isinstance(method, CompressMethod):
        raise ValueError(f"register_compress_method takes a CompressMethod, got {method!r}")
    return COMPRESS_METHODS.add(method)


def _owners(flag: str) -> str:
    """"method='a'", or "method='a', 'b' or 'c'": the methods whose row has `flag` set."""
    names = [repr(m) for m in COMPRESS_METHODS if getattr(COMPRESS_METHODS.get(m), flag)]
    return "method=" + (", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names))


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_options(method: str, *, rank=None, sparsity=None, budget=None, importance=None, router=None,
                  align=None) -> CompressMethod:
    """The row of `method`, with its options checked: one-line ValueErrors naming the option
    and what is wrong, or the methods it belongs to. None: not given (the method's default)."""
    if method not in COMPRESS_METHODS:
        raise ValueError(f"method={method!r} must be one of {', '.join(COMPRESS_METHODS)}")
    spec = COMPRESS_METHODS.get(method)
    if spec.low_rank:
        if rank is None or (sparsity is None) == (budget is None):
            raise ValueError(f"method={method!r} needs rank and exactly one of sparsity or budget")
        if not is_int(rank) or rank < 1:
            raise ValueError(f"rank={rank!r} must be an integer >= 1")
        if sparsity is not None and not (_number(sparsity) and 0 <= sparsity <= 1):
            raise ValueError(f"sparsity={sparsity!r} must be a number in [0, 1]")
        if budget is not None and not (_number(budget) and 0 < budget <= 1):
            raise ValueError(f"budget={budget!r} must be a number in (0, 1]")
    elif rank is not None or sparsity is not None or budget is not None:
        raise ValueError(f"rank, sparsity and budget belong to {_owners('low_rank')}, not {method!r}")
    for name, value, choices, flag in (("importance", importance, IMPORTANCES, "low_rank"),
                                       ("router", router, ROUTER_MODES, "merges"),
                                       ("align", align, ALIGNMENTS, "aligns")):
        if value is None:
            continue
        if value not in choices:
            raise ValueError(f"{name}={value!r} must be one of {', '.join(map(repr, choices))}")
        if not getattr(spec, flag):
            raise ValueError(f"{name} belongs to {_owners(flag)}, not {method!r}")
    return spec


def check_target_experts(cfg, target_experts, source: str = "the model") -> None:
    """ValueError unless `target_experts` (experts per MoE layer, on average) is a number
    between 1 and the most experts a MoE layer of `cfg` (an LMConfig) has."""
    if not isinstance(target_experts, numbers.Real) or isinstance(target_experts, bool):
        raise ValueError(f"target_experts={target_experts!r} must be a number")
    counts = [cfg.moe_for(i).num_experts for i in cfg.moe_layers] if cfg.moe is not None else []
    if not counts:
        raise ValueError(f"{source} is a dense model: there are no experts to reduce")
    most = max(counts)
    if not (math.isfinite(target_experts) and 1 <= target_experts <= most):
        raise ValueError(f"target_experts={target_experts:g} must be between 1 and {most}, the experts per MoE layer "
                         f"of {source}")
