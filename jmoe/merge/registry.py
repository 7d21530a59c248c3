"""The table of merge methods: every method is registered once, next to its code, with its
parameters, and everything that takes a method by name reads this table.

A merge method is a function `fn(base, models, *, **params) -> tree` (or `fn(models, *, ...)`,
without a base: its first parameter is not named `base`). Registering it:

    @merge_method(Param("t", layered=True, convert=float), mergekit=True)
    def halfway(base, models, *, t=0.5, filter=None, num_layers=None):
        ...

(or `register_merge_method(halfway, Param(...), mergekit=True)`). Every keyword-only parameter
of the function is a parameter of the method, with the function's default; a `Param` says
more about one of them:

  layered         the value may vary over layers and leaves (a gradient, or a list of
                  {filter, value} entries, see `jmoe.merge.tree`); elsewhere a list is an error
  per_model       the value may be a list with one entry per model; a merge configuration
                  reads it per model (mergekit's model-level parameters: weight, density)
  yaml            its key in a merge configuration (True: its own name; False: not readable)
  convert         configuration value -> the function's value (e.g. float, or mergekit's
                  boolean `normalize` -> a TIES `disjoint` mode)
  valid           converted value -> None when it is allowed, else what is wrong ("must be
                  in (0, 1]"); a merge configuration's values are checked with convert and
                  valid when it is read, before anything is merged
  config_default  the value when a configuration leaves it out, where that differs from the
                  function's default (or the function has none)

A list for a `per_model` parameter must have one entry per model (an entry may itself be a
layer gradient or a list of {filter, value} entries); a list of {filter, value} entries is
shared by every model. To give every model the same gradient, repeat it: `[gradient] * n`.

Out of core, a parameter named `key` receives the run's PRNG key (`jmoe merge --seed`), and
one named `thresholds` the whole-model magnitude thresholds of `scope: global` (TIES).

Readers of `MERGE_METHODS`: `jmoe.merge.<name>` (checks the keyword parameters against the
table, then calls the function), the mergekit reader (`jmoe.merge.mergekit`: merge_method,
parameter names, lists only where layered) and the out-of-core engine
(`jmoe.merge.checkpoints`: resolves each configuration parameter per tensor and calls the same
function on one tensor at a time). A method is available to merge configurations (`jmoe merge`)
when registered with mergekit=True, which promises the same result merged one tensor at a time
(no whole-model statistics, no inputs besides the models).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from types import MappingProxyType
from typing import Any, Callable, Mapping, TypeVar

from jmoe.merge.tree import MergeError
from jmoe.registry import Registry

T = TypeVar("T")


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


REQUIRED = _Marker("REQUIRED")  # the default of a parameter the function has no default for
UNSET = _Marker("UNSET")  # a Param field left to what the function says


class MethodTable(Registry[T]):
    """A `jmoe.registry.Registry` of method records, each registered under its own `name`."""

    def add(self, record: T) -> T:  # type: ignore[override]
        """Register `record` under `record.name`."""
        return super().add(getattr(record, "name", None), record)

    def remove(self, name: str) -> T:  # type: ignore[override]
        """Unregister `name` (methods added by scripts and tests); returns its record."""
        record = self.get(name)
        super().remove(name)
        return record

    def __len__(self) -> int:
        return len(self.names())


_TRUE, _FALSE = {"true", "yes", "on", "1", "t", "y"}, {"false", "no", "off", "0", "f", "n"}


def as_bool(value: Any) -> bool:
    """A boolean parameter's value: a bool, 0 or 1, or a word pydantic reads as one ("true",
    "false", "yes", "no", "on", "off", "1", "0"); ValueError for anything else ("false" must
    not read as True, as bool("false") would)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{value!r} is not a boolean (true or false)")


@dataclasses.dataclass(frozen=True)
class Param:
    """What the table knows about one keyword parameter of a merge method (see the module
    docstring). `default` is filled in from the function's signature at registration."""

    name: str
    layered: bool = False
    per_model: bool = False
    yaml: str | bool = True
    convert: Callable[[Any], Any] | None = None
    valid: Callable[[Any], str | None] | None = None
    config_default: Any = UNSET
    default: Any = UNSET

    @property
    def key(self) -> str | None:
        """Its key in a merge configuration (None: not readable from one)."""
        if self.yaml is True:
            return self.name
        return self.yaml or None

    @property
    def when_absent(self) -> Any:
        """The value a configuration that leaves it out gets (REQUIRED: it must give one)."""
        return self.default if self.config_default is UNSET else self.config_default

    def check(self, value: Any, method: str, num_models: int | None = None) -> None:
        """MergeError naming the method and parameter when `value` is a list and the
        parameter may not vary over layers (where `per_model`, a list of one value per model
        passes; num_models None: any length), or a per-model list has the wrong length."""
        if not isinstance(value, (list, tuple)):
            return
        if self.per_model and num_models is not None and len(value) != num_models and not _is_filter_list(value):
            gradient = f", or the same layer gradient for each as [gradient] * {num_models}" if self.layered else ""
            raise MergeError(f"merge method {method!r}: parameter {self.name!r} is a list of {len(value)} values for "
                             f"{num_models} model{'' if num_models == 1 else 's'} (give one value, or one per "
                             f"model{gradient})")
        if self.layered:
            return
        if self.per_model and (num_models is None or len(value) == num_models) \
                and not any(isinstance(v, (list, tuple)) for v in value):
            return
        per = " or one per model" if self.per_model else ""
        raise MergeError(f"merge method {method!r}: parameter {self.name!r} cannot vary over layers "
                         f"(give one value{per}), got {value!r}")

    def check_config(self, value: Any, method: str, where: str) -> None:
        """`check` for a value of a merge configuration, where a list is always a gradient or
        a filter list (models give their own values in their own `parameters`)."""
        if not self.layered and isinstance(value, (list, tuple)):
            raise MergeError(f"{where}: merge method {method!r}: parameter {self.key!r} cannot vary over layers "
                             f"(give one value), got {value!r}")
        for v in _scalars(value, where):
            if v is None:
                continue
            try:
                converted = v if self.convert is None else self.convert(v)
            except (TypeError, ValueError) as e:
                raise MergeError(f"{where}: merge method {method!r}: {self.key}={v!r} is not valid ({e})") from None
            problem = self.valid(converted) if self.valid is not None else None
            if problem:
                raise MergeError(f"{where}: merge method {method!r}: {self.key}={v!r} {problem}")


def _is_filter_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _scalars(value: Any, where: str):
    """The plain values inside a configuration value: itself, the entries of a gradient, or
    the values of {filter, value} entries (MergeError naming `where` for malformed lists)."""
    if _is_filter_list(value):
        for entry in value:
            unknown = sorted(set(entry) - {"filter", "value"})
            if unknown or "value" not in entry:
                raise MergeError(f"{where}: conditional entry {dict(entry)!r} must have a 'value' and may have a 'filter'")
            flt = entry.get("filter")
            if flt is not None:
                if not isinstance(flt, str):
                    raise MergeError(f"{where}: filter {flt!r} must be a regular expression")
                try:
                    re.compile(flt)
                except re.error as e:
                    raise MergeError(f"{where}: filter {flt!r} is not a valid regular expression ({e})") from None
            yield from _scalars(entry["value"], where)
    elif isinstance(value, (list, tuple)):
        if not value:
            raise MergeError(f"{where}: an empty list is not a gradient")
        for v in value:
            if isinstance(v, (list, tuple, Mapping)):
                raise MergeError(f"{where}: a gradient must be a list of numbers, got {value!r}")
            yield v
    elif isinstance(value, Mapping):
        raise MergeError(f"{where}: give a value, a gradient or a list of {{filter, value}} entries, got {dict(value)!r}")
    else:
        yield value


@dataclasses.dataclass(frozen=True, eq=False)
class MergeMethod:
    """One row of the merge-method table. Calling it checks the keyword parameters against
    the table (one-line MergeError naming the method and parameter) and calls `fn`.

    name: the method's name (`jmoe.merge.<name>`, a configuration's merge_method).
    fn: the function. params: every keyword-only parameter of `fn`, in order. inputs: its
    positional parameters ("base", "models"; "models", "fishers"; ...). mergekit: readable
    from merge configurations (the out-of-core engine). num_models: the exact number of models besides
    the base, when fixed. ignored: configuration keys accepted without effect. optional_base:
    the function takes a base first but accepts None (a configuration may leave out base_model).
    """

    name: str
    fn: Callable[..., Any]
    params: Mapping[str, Param]
    inputs: tuple[str, ...]
    mergekit: bool = False
    num_models: int | None = None
    ignored: tuple[str, ...] = ()
    optional_base: bool = False

    def __post_init__(self):
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
        # look like the function to help(), inspect.signature and jax.jit
        for attr, value in (("__doc__", self.fn.__doc__), ("__name__", self.name), ("__wrapped__", self.fn)):
            object.__setattr__(self, attr, value)

    @classmethod
    def of(cls, fn: Callable[..., Any], *params: Param, name: str | None = None, mergekit: bool = False,
           num_models: int | None = None, ignored: tuple[str, ...] = (), optional_base: bool = False) -> "MergeMethod":
        """The record of `fn`: its keyword-only parameters with their defaults, described
        further by `params` (each must name one of them)."""
        name = name or fn.__name__
        sig = inspect.signature(fn)
        positional = [p for p in sig.parameters.values()
                      if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        if not positional:
            raise ValueError(f"merge method {name!r}: {fn.__qualname__} must take the models (or a base and the "
                             "models) positionally")
        keyword = {p.name: p for p in sig.parameters.values() if p.kind == inspect.Parameter.KEYWORD_ONLY}
        declared = {}
        for p in params:
            if not isinstance(p, Param):
                raise ValueError(f"merge method {name!r}: parameters are described with Param, got {p!r}")
            if p.name not in keyword:
                raise ValueError(f"merge method {name!r}: Param {p.name!r} is not a keyword-only parameter of "
                                 f"{fn.__qualname__} (it has {', '.join(keyword) or 'none'})")
            if p.name in declared:
                raise ValueError(f"merge method {name!r}: Param {p.name!r} is given twice")
            if p.default is not UNSET:
                raise ValueError(f"merge method {name!r}: Param {p.name!r} takes its default from the function's signature")
            declared[p.name] = p
        table = {}
        for pname, sp in keyword.items():
            p = declared.get(pname, Param(pname, yaml=False))
            table[pname] = dataclasses.replace(p, default=REQUIRED if sp.default is sp.empty else sp.default)
        keys = [p.key for p in table.values() if p.key is not None] + list(ignored)
        clash = sorted({k for k in keys if keys.count(k) > 1})
        if clash:
            raise ValueError(f"merge method {name!r}: configuration key(s) {', '.join(clash)} are given twice")
        unreadable = [k for k, p in table.items() if p.default is REQUIRED and p.key is None and k != "key"]
        if mergekit and unreadable:
            raise ValueError(f"merge method {name!r}: required parameter {unreadable[0]!r} must be readable from a "
                             f"configuration (describe it with Param) for mergekit=True")
        if optional_base and positional[0].name != "base":
            raise ValueError(f"merge method {name!r}: optional_base needs a function that takes a base first")
        return cls(name, fn, table, tuple(p.name for p in positional), mergekit=mergekit,
                   num_models=num_models, ignored=tuple(ignored), optional_base=optional_base)

    @property
    def base(self) -> bool:
        """Whether the function takes a base model first."""
        return self.inputs[0] == "base"

    @property
    def config_params(self) -> dict[str, Param]:
        """{configuration key: Param} of the parameters a merge configuration may set."""
        return {p.key: p for p in self.params.values() if p.key is not None}

    def check(self, params: Mapping[str, Any], num_models: int | None = None) -> None:
        """MergeError naming the method and parameter: unknown names, lists where the
        parameter may not vary over layers, required parameters left out."""
        for k, v in params.items():
            p = self.params.get(k)
            if p is None:
                raise MergeError(f"merge method {self.name!r} has no parameter {k!r} "
                                 f"(it takes {', '.join(self.params) or 'none'})")
            p.check(v, self.name, num_models)
        missing = [k for k, p in self.params.items() if p.default is REQUIRED and k not in params]
        if missing:
            raise MergeError(f"merge method {self.name!r} needs parameter {missing[0]!r}")

    def check_config(self, params: Mapping[str, Any], where: str) -> dict:
        """The parameters of one `parameters:` mapping of a merge configuration, checked:
        MergeError naming `where`, the method and the parameter."""
        allowed = self.config_params
        extra = sorted(set(params) - set(allowed) - set(self.ignored))
        if extra:
            reads = sorted(set(allowed) | set(self.ignored))
            raise MergeError(f"{where}: parameter(s) {', '.join(extra)} are not used by merge_method {self.name!r} "
                             f"(it reads {', '.join(reads) or 'none'})")
        for k, v in params.items():
            if k in allowed:
                allowed[k].check_config(v, self.name, f"{where}.{k}")
        return dict(params)

    def __call__(self, *args, **kwargs):
        given = dict(zip(self.inputs, args))
        given.update((k, v) for k, v in kwargs.items() if k in self.inputs)
        models = given.get("models")
        self.check({k: v for k, v in kwargs.items() if k not in self.inputs},
                   len(models) if isinstance(models, (list, tuple)) else None)
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<merge method {self.name!r}: {', '.join(self.params)}>"


MERGE_METHODS: MethodTable[MergeMethod] = MethodTable("merge method")


def register_merge_method(fn: Callable[..., Any], *params: Param, name: str | None = None, mergekit: bool = False,
                          num_models: int | None = None, ignored: tuple[str, ...] = (),
                          optional_base: bool = False) -> MergeMethod:
    """Register `fn` as a merge method (see the module docstring); returns its record.
    `MERGE_METHODS.remove(name)` unregisters it."""
    return MERGE_METHODS.add(MergeMethod.of(fn, *params, name=name, mergekit=mergekit, num_models=num_models,
                                            ignored=ignored, optional_base=optional_base))


def merge_method(*params: Param, name: str | None = None, mergekit: bool = False, num_models: int | None = None,
                 ignored: tuple[str, ...] = (), optional_base: bool = False):
    """Decorator form of `register_merge_method`; returns the function unchanged."""

    def deco(fn):
        register_merge_method(fn, *params, name=name, mergekit=mergekit, num_models=num_models, ignored=ignored,
                              optional_base=optional_base)
        return fn

    return deco
