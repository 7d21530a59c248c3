"""mergekit's `tokenizer_source`: the merged model's vocabulary, and every model's embedding
rows moved to it by token string, as mergekit 0.1.5 does (mergekit/tokenizer/build.py and
embed.py), with the `tokenizers` package (no transformers needed).

  base           the base model's tokenizer (the first model's without a base), stripped
                 of tokens at or past its config's vocab_size (and of the BPE merges that
                 use or make them; mergekit drops only those that use them)
  union          the base tokenizer plus, in model order, every other model's tokens it
                 lacks (added as normal added tokens), then every model's added tokens
  a directory    that model's tokenizer

Each model's vocabulary maps the output's token ids to its own rows (-1: it lacks the token).
Before the merge, every embedding tensor (`model.embed_tokens.weight`, `lm_head.weight`) of
every model is rebuilt with one row per output token: its own row where it has the token,
otherwise the token's default row: the one model that has it (its donor), the base's where
the base has it, else the mean over the models that have it, zeros where none has it. Merging
then runs on equal shapes, and config.json's vocab_size becomes the output vocabulary's size.

As in mergekit, and worth knowing: tokens a union borrows from other models are added
tokens, which match the raw text before pre-tokenisation, so they can split the base's words
(and byte-level tokens such as "Ġword" never match at all); and the output has one row per
token of its tokenizer, so a base whose config pads vocab_size past its tokenizer (Qwen2:
151936 rows for 151665 tokens) loses the padding rows.

mergekit's `tokenizer:` block (instead of tokenizer_source) adds `tokens`, a row source per
token (a model's row for it, zeros, or a model's row of another token by id or by string;
`force` gives every model that row even where it has the token; a token the vocabulary lacks
is added to it), and `pad_to_multiple_of` (zero rows up to a multiple).

Where jmoe differs: a model without a readable tokenizer.json is an error (mergekit assumes
the base's vocabulary and goes on), as is a token override whose source lacks the token. With base or union, the output's tokenizer is its
tokenizer.json alone (the base's slow-tokenizer files are not copied).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from jmoe.merge.tree import MergeError

EMBEDDINGS = ("embed_tokens.weight", "lm_head.weight")


def is_embedding(name: str) -> bool:
    """Whether tensor `name` has one row per vocabulary entry."""
    return name.endswith(EMBEDDINGS)


@dataclasses.dataclass
class Vocabulary:
    """The output tokenizer (a `tokenizers.Tokenizer`), its vocabulary {token: id}, and for
    every model directory the row of each output token in that model (-1 where it lacks it)."""

    tokenizer: object
    vocab: dict[str, int]
    rows: dict[Path, np.ndarray]
    base: Path | None
    overrides: dict = dataclasses.field(default_factory=dict)  # output id -> {"source", "force"}
    original: dict = dataclasses.field(default_factory=dict)  # model directory -> its vocab {token: row}
    pad_to_multiple_of: int | None = None

    @property
    def size(self) -> int:
        """Rows of the output's embeddings: the vocabulary, padded up to a multiple of
        pad_to_multiple_of (zero rows) when given."""
        n, m = len(self.vocab), self.pad_to_multiple_of
        return n if not m else -(-n // m) * m

    def _override(self, t: int, cfg: dict, arrays: dict, rows: np.ndarray, models: list) -> np.ndarray | None:
        kind, *args = cfg["source"]
        token = next(k for k, v in self.vocab.items() if v == t)
        where = f"tokenizer.tokens[{token!r}]"
        if kind == "zero":
            return None
        model = args[0]
        if model not in arrays:
            raise MergeError(f"{where}: model {str(model)!r} has no tensor here (not among this tensor's inputs)")
        a = arrays[model]
        if kind == "model":
            row = rows[models.index(model), t]
            if row < 0:
                raise MergeError(f"{where}: model {str(model)!r} has no token {token!r}")
        else:
            tid, ttok = args[1], args[2]
            if ttok is not None:
                if ttok not in self.original.get(model, {}):
                    raise MergeError(f"{where}: token {ttok!r} is not in the vocabulary of {str(model)!r}")
                tid = self.original[model][ttok]
            row = tid
            if not 0 <= row < a.shape[0]:
                raise MergeError(f"{where}: token_id {row} is outside the {a.shape[0]} rows of {str(model)!r}")
        return a[row].astype(np.float32)

    def permute(self, arrays: dict[Path, np.ndarray]) -> dict[Path, np.ndarray]:
        """Each model's embedding tensor [V_model, d] (arrays: {model directory: tensor}) as
        [V_out, d] rows of the output vocabulary, missing rows filled with the defaults."""
        dims = {a.shape[1:] for a in arrays.values()}
        if len(dims) > 1:
            raise MergeError(f"embedding sizes differ across models: {sorted(dims)}")
        models = list(arrays)
        rows = np.stack([self.rows[m] for m in models])  # [M, V_out]
        # a token's row must exist in the model's tensor
        present = (rows >= 0) & (rows < np.asarray([arrays[m].shape[0] for m in models])[:, None])
        first = arrays[models[0]]
        n = len(self.vocab)
        default = np.zeros((self.size, *first.shape[1:]), np.float32)  # padding rows stay zero
        base = models.index(self.base) if self.base in arrays else None
        force = np.zeros(self.size, bool)
        for t in range(n):
            if t in self.overrides:
                row = self._override(t, self.overrides[t], arrays, rows, models)
                default[t] = 0.0 if row is None else row
                force[t] = self.overrides[t]["force"]
                continue
            have = np.flatnonzero(present[:, t])
            if len(have) == 0:
                continue
            if len(have) == 1:
                src = [have[0]]
            elif base is not None and present[base, t]:
                src = [base]
            else:
                src = list(have)
            default[t] = np.mean([arrays[models[i]][rows[i, t]].astype(np.float32) for i in src], axis=0)
        out = {}
        for i, m in enumerate(models):
            a = arrays[m]
            new = default.astype(a.dtype)
            own = np.zeros(self.size, bool)
            own[:n] = present[i] & ~force[:n]
            new[own] = a[rows[i, :n][own[:n]]]
            out[m] = new
        return out


def _config_vocab_size(model: Path) -> int | None:
    try:
        return int(json.loads((model / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _load(model: Path, *, strip: bool = False):
    """(tokenizers.Tokenizer, its usable vocab {token: id}) of `model`; strip: rebuild the
    tokenizer without the tokens at or past the config's vocab_size (BPE only, as mergekit)."""
    import tokenizers

    path = model / "tokenizer.json"
    try:
        data = json.loads(path.read_text())
        tok = tokenizers.Tokenizer.from_str(json.dumps(data))
    except (OSError, ValueError, Exception) as e:  # tokenizers raises its own Exception type
        raise MergeError(f"tokenizer_source: {path} is not a readable tokenizer ({str(e).splitlines()[0][:120]})") from None
    size = _config_vocab_size(model)
    vocab = tok.get_vocab(with_added_tokens=True)
    unused = {t for t, i in vocab.items() if size is not None and i >= size}
    if strip and unused:
        if data.get("model", {}).get("type") != "BPE":
            raise MergeError(f"tokenizer_source: {path} has tokens past vocab_size {size} and is not BPE; only BPE "
                             f"tokenizers can be stripped of them")
        data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < size]
        for t in unused:
            data["model"]["vocab"].pop(t, None)
        def keep(merge) -> bool:  # neither a part nor the product of the merge is gone
            parts = merge.split(" ") if isinstance(merge, str) else list(merge)
            return not any(p in unused for p in parts) and "".join(parts) not in unused

        data["model"]["merges"] = [m for m in data["model"].get("merges", []) if keep(m)]
        tok = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok, {t: i for t, i in vocab.items() if t not in unused}


def _union(base_tok, tokenizers_: Sequence[tuple[object, dict]]):
    import tokenizers

    out_vocab: dict[str, None] = {}
    added: dict[str, object] = {}
    for tok, vocab in tokenizers_:
        usable = set(vocab.values())
        for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
            out_vocab.setdefault(t, None)
        for i, info in sorted(tok.get_added_tokens_decoder().items()):
            if i in usable and info.content not in added:
                added[info.content] = info
    res = tokenizers.Tokenizer.from_str(base_tok.to_str())
    have = res.get_vocab(with_added_tokens=True)
    new = [t for t in out_vocab if t not in added and t not in have]
    res.add_tokens([tokenizers.AddedToken(t, normalized=True, special=False) for t in new])
    for info in added.values():
        (res.add_special_tokens if info.special else res.add_tokens)([info])
    return res


def build(source: str, base: Path | None, models: Sequence[Path], tokens: dict | None = None,
          pad_to_multiple_of: int | None = None) -> Vocabulary:
    """The output vocabulary of `tokenizer_source` (`source`: "base", "union" or a model
    directory) over the model directories `models` (the base first when there is one).
    tokens: mergekit's `tokenizer.tokens`, checked ({token: {"source": ("model", dir) |
    ("zero",) | ("model_token", dir, token_id, token), "force": bool}}); tokens the vocabulary
    lacks are added to it. pad_to_multiple_of: pad the embeddings' rows with zeros."""
    import tokenizers

    ref = base or models[0]
    loaded = {ref: _load(ref, strip=True)}
    for m in models:
        if m not in loaded:
            loaded[m] = _load(m)
    if source == "base":
        out = loaded[ref][0]
    elif source == "union":
        out = _union(loaded[ref][0], [loaded[m] for m in [ref, *[m for m in models if m != ref]]])
    else:
        out = _load(Path(source))[0]
    tokens = tokens or {}
    have = out.get_vocab(with_added_tokens=True)
    missing = [t for t in tokens if t not in have]
    if missing:
        out.add_tokens([tokenizers.AddedToken(t, normalized=True, special=False) for t in missing])
    vocab = out.get_vocab(with_added_tokens=True)
    rows = {}
    for m, (_, mv) in loaded.items():
        r = np.full(len(vocab), -1, np.int64)
        for t, i in vocab.items():
            if i >= len(vocab):
                raise MergeError(f"tokenizer_source: the output vocabulary has id {i} past its size {len(vocab)}")
            r[i] = mv.get(t, -1)
        rows[m] = r
    for t, cfg in tokens.items():  # what can be checked before any tensor is read
        kind, *args = cfg["source"]
        where = f"tokenizer.tokens[{t!r}].source"
        if kind == "model" and rows[args[0]][vocab[t]] < 0:
            raise MergeError(f"{where}: model {str(args[0])!r} has no token {t!r}")
        if kind == "model_token" and args[2] is not None and args[2] not in loaded[args[0]][1]:
            raise MergeError(f"{where}: token {args[2]!r} is not in the vocabulary of {str(args[0])!r}")
    return Vocabulary(out, vocab, rows, ref if base is not None else None,
                      overrides={vocab[t]: cfg for t, cfg in tokens.items()},
                      original={m: mv for m, (_, mv) in loaded.items()}, pad_to_multiple_of=pad_to_multiple_of)
