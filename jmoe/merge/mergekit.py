"""mergekit's YAML configuration, for the methods jmoe shares with it.

Accepted keys (anything else is an error naming it):
  merge_method      a method of `jmoe.merge.MERGE_METHODS` registered with mergekit=True
                    (`supported_methods()`: linear, slerp, ties, dare_ties, passthrough, ...)
  base_model        a local model directory
  models            [{model: dir, parameters: {...}}]            (or)
  slices            [{sources: [{model, layer_range: [a, b], parameters}], parameters}]
  parameters        method parameters (values, layer gradients, or [{filter, value}] lists)
  dtype, out_dtype  float32 | float16 | bfloat16 (compute is float32; output dtype: out_dtype,
                    else dtype, else the base tensor's)
  tokenizer_source  "base", "union" or a model directory: the output's vocabulary, every
                    model's embedding rows moved to it by token (`jmoe.merge.vocab`); without
                    it the base's tokenizer files are copied and the vocabularies must agree
  tokenizer         instead of tokenizer_source: {source (default union), tokens: {TOKEN:
                    {source: DIR | {kind: zero} | {kind: model_token, model, token_id | token},
                    force}}, pad_to_multiple_of}; a token missing from the vocabulary is added
  name              ignored

Parameters resolve per tensor, as mergekit does: the model's own `parameters`, then the
slice's, then the top-level ones, then the method's default. Which parameters a method reads,
their defaults, which are read per model and which may be lists (layer gradients, filter
lists) come from its row of the table; anything else is an error naming the method and the
parameter. jmoe additions: `scope: global` for ties (whole-model trim) and
`rescale: inverse | l1`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from jmoe.merge.registry import MERGE_METHODS, REQUIRED, MergeMethod
from jmoe.merge.tree import MergeError

TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "tokenizer", "name"}
TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
MODEL_KEYS = {"model", "parameters"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
SLICE_KEYS = {"sources", "parameters", "base_model"}
DTYPES = {"float32", "float16", "bfloat16"}


def supported_methods() -> list[str]:
    """The merge methods a configuration may name: those registered with mergekit=True."""
    return [name for name in MERGE_METHODS if MERGE_METHODS.get(name).mergekit]


def method_of(name) -> MergeMethod:
    """The table row of merge_method `name`; MergeError listing the supported ones otherwise."""
    if isinstance(name, str) and name in MERGE_METHODS and not MERGE_METHODS.get(name).mergekit:
        raise MergeError(f"merge_method {name!r} merges in memory only (it needs data or whole models, not one tensor "
                         f"at a time): call jmoe.merge.{name}; a configuration takes {', '.join(supported_methods())}")
    if name not in MERGE_METHODS or not MERGE_METHODS.get(name).mergekit:
        raise MergeError(f"merge_method {name!r} is not supported; supported: {', '.join(supported_methods())}")
    return MERGE_METHODS.get(name)


@dataclasses.dataclass
class Source:
    model: Path
    layer_range: tuple[int, int] | None
    params: dict


@dataclasses.dataclass
class Slice:
    sources: list[Source]
    params: dict


@dataclasses.dataclass
class MergePlan:
    method: str
    base: Path | None
    slices: list[Slice] | None  # None: whole models (`models:`)
    models: list[Source]
    params: dict
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    raw: dict
    tokens: dict = dataclasses.field(default_factory=dict)  # tokenizer.tokens, checked (`_token_overrides`)
    pad_to_multiple_of: int | None = None

    @property
    def spec(self) -> MergeMethod:
        """The method's row of the merge-method table."""
        return method_of(self.method)

    def model_dirs(self) -> list[Path]:
        dirs = [self.base] if self.base else []
        for s in (self.slices or [Slice(self.models, {})]):
            for src in s.sources:
                if src.model not in dirs:
                    dirs.append(src.model)
        return dirs


def _unknown(d: dict, allowed: set, where: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise MergeError(f"{where}: unsupported key(s) {', '.join(extra)}")


def _model_path(ref: Any, root: Path, where: str) -> Path:
    if not isinstance(ref, str):
        raise MergeError(f"{where}: model must be a directory path, got {ref!r}")
    if "+" in ref or "@" in ref:
        raise MergeError(f"{where}: model {ref!r}: LoRA adapters and revisions are not supported, give a local directory")
    p = Path(ref).expanduser()
    p = p if p.is_absolute() else root / p
    if not p.is_dir():
        raise MergeError(f"{where}: model directory {str(p)!r} does not exist (jmoe merge reads local directories only)")
    return p


def _check_params(params: Any, method: MergeMethod, where: str) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise MergeError(f"{where}: parameters must be a mapping")
    return method.check_config(params, where)


def _exactly(n: int, what: str, base: bool) -> str:
    return f"exactly {'one' if n == 1 else n} {what}{'' if n == 1 else 's'}{' besides base_model' if base else ''}"


def parse_config(config: str | Path | dict, root: Path | None = None) -> MergePlan:
    """A `MergePlan` from a YAML file, YAML text or a dict (ValueError naming bad keys)."""
    if isinstance(config, dict):
        raw, root = config, root or Path.cwd()
    else:
        path = Path(config)
        if path.exists():
            if not path.is_file():
                raise MergeError(f"the merge configuration {str(path)!r} is not a file")
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise MergeError(f"the merge configuration {str(path)!r} cannot be read as text ({e})") from None
            root = root or path.parent
        else:
            text, root = str(config), root or Path.cwd()
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MergeError(f"the merge configuration is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise MergeError("the merge configuration must be a YAML mapping")
    _unknown(raw, TOP_KEYS, "config")
    if raw.get("merge_method") is None:
        raise MergeError(f"the merge configuration needs merge_method (one of {', '.join(supported_methods())})")
    spec = method_of(raw.get("merge_method"))
    method = spec.name
    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None and raw[key] not in DTYPES:
            raise MergeError(f"{key}={raw[key]!r} must be one of {', '.join(sorted(DTYPES))}")
    params = _check_params(raw.get("parameters"), spec, "parameters")
    base = _model_path(raw["base_model"], root, "base_model") if raw.get("base_model") else None
    if spec.base and not spec.optional_base and base is None:
        raise MergeError(f"merge_method {method!r} needs base_model")
    if ("models" in raw) == ("slices" in raw):
        raise MergeError("give exactly one of models or slices")
    models, slices = [], None
    if "models" in raw:
        if not isinstance(raw["models"], list) or not raw["models"]:
            raise MergeError("models must be a non-empty list")
        for i, m in enumerate(raw["models"]):
            if not isinstance(m, dict) or "model" not in m:
                raise MergeError(f"models[{i}] must be a mapping with a 'model' key")
            _unknown(m, MODEL_KEYS, f"models[{i}]")
            models.append(Source(_model_path(m["model"], root, f"models[{i}]"), None,
                                 _check_params(m.get("parameters"), spec, f"models[{i}].parameters")))
    else:
        slices = []
        if not isinstance(raw["slices"], list):
            raise MergeError("slices must be a non-empty list")
        for si, s in enumerate(raw["slices"]):
            if not isinstance(s, dict) or "sources" not in s:
                raise MergeError(f"slices[{si}] must be a mapping with 'sources'")
            if not isinstance(s["sources"], list) or not s["sources"]:
                raise MergeError(f"slices[{si}].sources must be a non-empty list")
            _unknown(s, SLICE_KEYS, f"slices[{si}]")
            if s.get("base_model"):
                raise MergeError(f"slices[{si}].base_model: per-slice base models are not supported")
            sources = []
            for j, src in enumerate(s["sources"]):
                where = f"slices[{si}].sources[{j}]"
                if not isinstance(src, dict) or "model" not in src:
                    raise MergeError(f"{where} must be a mapping with a 'model' key")
                _unknown(src, SOURCE_KEYS, where)
                lr = src.get("layer_range")
                if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(v, int) for v in lr) and lr[0] < lr[1]):
                    raise MergeError(f"{where}.layer_range must be [start, end) with start < end")
                sources.append(Source(_model_path(src["model"], root, where), (lr[0], lr[1]),
                                      _check_params(src.get("parameters"), spec, f"{where}.parameters")))
            lengths = {src.layer_range[1] - src.layer_range[0] for src in sources}
            if len(lengths) != 1:
                raise MergeError(f"slices[{si}]: all sources must span the same number of layers")
            others = [src for src in sources if not (spec.base and src.model == base)]
            if spec.num_models is not None and len(others) != spec.num_models:
                raise MergeError(f"slices[{si}]: {method} takes {_exactly(spec.num_models, 'source', spec.base)}")
            slices.append(Slice(sources, _check_params(s.get("parameters"), spec, f"slices[{si}].parameters")))
        if not slices:
            raise MergeError("slices must be a non-empty list")
    others = [m for m in models if not (spec.base and m.model == base)]
    if spec.num_models is not None and slices is None and len(others) != spec.num_models:
        raise MergeError(f"{method} over models takes {_exactly(spec.num_models, 'model', spec.base)}")
    if raw.get("tokenizer_source") is not None and raw.get("tokenizer") is not None:
        raise MergeError("give tokenizer_source or tokenizer, not both")
    block = raw.get("tokenizer")
    if block is not None and not isinstance(block, dict):
        raise MergeError("tokenizer must be a mapping (source, tokens, pad_to_multiple_of)")
    if block is not None:
        _unknown(block, TOKENIZER_KEYS, "tokenizer")
    tok = raw.get("tokenizer_source") if block is None else block.get("source", "union")
    where = "tokenizer_source" if block is None else "tokenizer.source"
    if tok is not None:
        if not isinstance(tok, str):
            raise MergeError(f"{where}={tok!r} must be 'base', 'union' or a model directory")
        if tok not in ("base", "union"):
            tok = str(_model_path(tok, root, where))
    plan = MergePlan(method, base, slices, models, params, raw.get("dtype"), raw.get("out_dtype"), tok, raw)
    if block is not None:
        plan.tokens, plan.pad_to_multiple_of = _token_overrides(block, root, plan.model_dirs())
    _check_required(plan)
    return plan


def _token_overrides(block: dict, root: Path, dirs: list[Path]) -> tuple[dict, int | None]:
    """mergekit's `tokenizer.tokens` ({token: {source, force}}) and `pad_to_multiple_of`, checked:
    a source is a model of the merge, {kind: zero} or {kind: model_token, model, token_id |
    token}."""
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise MergeError(f"tokenizer.pad_to_multiple_of={pad!r} must be a positive integer")
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise MergeError("tokenizer.tokens must be a mapping of token -> {source, force}")
    out = {}
    for token, spec in tokens.items():
        where = f"tokenizer.tokens[{token!r}]"
        if not isinstance(token, str) or not isinstance(spec, dict):
            raise MergeError(f"{where} must map a token string to {{source, force}}")
        _unknown(spec, {"source", "force"}, where)
        force = spec.get("force", False)
        if not isinstance(force, bool):
            raise MergeError(f"{where}.force={force!r} must be true or false")
        src = spec.get("source")

        def member(ref, w):
            p = _model_path(ref, root, w)
            if p not in dirs:
                raise MergeError(f"{w}: model {str(p)!r} is not part of the merge")
            return p

        if isinstance(src, str):
            source = ("model", member(src, f"{where}.source"))
        elif isinstance(src, dict) and src.get("kind") == "zero":
            _unknown(src, {"kind"}, f"{where}.source")
            source = ("zero",)
        elif isinstance(src, dict) and src.get("kind") == "model_token":
            _unknown(src, {"kind", "model", "token_id", "token"}, f"{where}.source")
            if ("token_id" in src) == ("token" in src):
                raise MergeError(f"{where}.source: give exactly one of token_id or token")
            tid, ttok = src.get("token_id"), src.get("token")
            if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or tid < 0):
                raise MergeError(f"{where}.source.token_id={tid!r} must be a non-negative integer")
            if ttok is not None and not isinstance(ttok, str):
                raise MergeError(f"{where}.source.token={ttok!r} must be a string")
            source = ("model_token", member(src.get("model"), f"{where}.source.model"), tid, ttok)
        else:
            raise MergeError(f"{where}.source must be a model directory, {{kind: zero}} or "
                             "{kind: model_token, model, token_id | token}")
        out[token] = {"source": source, "force": force}
    return out, pad


def _check_required(plan: MergePlan) -> None:
    """MergeError naming the method and parameter when a parameter the method needs is given
    neither at the top level nor where every model (or slice) would find it."""
    spec = plan.spec
    for key, prm in spec.config_params.items():
        if prm.when_absent is not REQUIRED or key in plan.params:
            continue
        for sl in plan.slices or [Slice(plan.models, {})]:
            if key in sl.params:
                continue
            if not prm.per_model:
                raise MergeError(f"merge_method {spec.name!r} needs parameter {key}")
            for src in sl.sources:
                if key not in src.params and not (spec.base and src.model == plan.base):
                    raise MergeError(f"merge_method {spec.name!r} needs parameter {key} for model {str(src.model)!r}")
