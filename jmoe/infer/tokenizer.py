"""Text <-> token ids for generation: jmoe's byte-level models and Hugging Face tokenizer directories.

`load_tokenizer(None)` is the `ByteTokenizer` of jmoe's byte-level models (ids are UTF-8 bytes);
`load_tokenizer(dir)` reads a Hugging Face model directory with the `tokenizers` library and
renders its chat template with jinja2 the way transformers does, so neither `transformers`
nor the network is needed at run time. Every tokenizer has a `stream_decoder()` that turns ids
into text as they are generated, holding back an unfinished UTF-8 character or merge.

    tok = load_tokenizer("Qwen1.5-MoE-A2.7B-Chat")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.encode_chat(prompt)  # the template already holds BOS when the model wants one
"""

from __future__ import annotations

import abc
import codecs
import functools
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import tokenizers

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "load_tokenizer",
    "render_chat_template",
]

# The named special tokens transformers passes to every chat template (`special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _ids_list(ids: Sequence[int], name: str = "ids") -> list[int]:
    try:
        return [int(i) for i in ids]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of integer token ids, got {type(ids).__name__}") from None


class StreamDecoder(abc.ABC):
    """Incremental detokenisation: ids in as they are generated, final text out.

    `push` returns only text that later ids cannot change (never a U+FFFD standing for a
    character whose bytes have not all arrived); `flush` returns the rest, with replacement
    characters where the ids truly are not valid text. The pushes and the flush together
    give the tokenizer's `decode` of all the ids.
    """

    @abc.abstractmethod
    def push(self, ids: Sequence[int]) -> str:
        """ids: [n] new token ids -> the text that is now final."""

    @abc.abstractmethod
    def flush(self) -> str:
        """The text still held back; the decoder can be pushed to again afterwards."""


class _ByteStream(StreamDecoder):
    """UTF-8 bytes (ids < 256) through an incremental decoder; other ids are skipped."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: Sequence[int]) -> str:
        return self._decoder.decode(bytes(i for i in _ids_list(ids) if 0 <= i < 256))

    def flush(self) -> str:
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


class _WindowStream(StreamDecoder):
    """Decode a sliding window of ids and emit the new suffix (text-generation-inference's scheme).

    `ids[prefix:read]` decodes to text already emitted; each push decodes `ids[prefix:]` and
    emits what follows that text, unless it ends in U+FFFD (an incomplete character). Decoding
    from `prefix` rather than `read` keeps the context decoders need (spaces between words,
    a sentencepiece tokenizer's leading-space rule), and bounds the work per push.
    """

    def __init__(self, decode):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _advance(self, final: bool) -> str:
        done = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if not final and (len(text) <= len(done) or text.endswith("\ufffd")):
            return ""
        del self._ids[: self._read]  # only the window is ever decoded again
        self._prefix, self._read = 0, len(self._ids)
        return text[len(done) :]

    def push(self, ids: Sequence[int]) -> str:
        new = _ids_list(ids)
        if not new:
            return ""
        self._ids.extend(new)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True) if self._read < len(self._ids) else ""


class Tokenizer(abc.ABC):
    """What generation needs from a tokenizer.

    Attributes: `vocab_size` (the size of the id space it produces), `eos_ids` (ids that end a
    generation; may be empty), `bos_id` (the model's beginning-of-sequence id, or None).
    """

    vocab_size: int
    eos_ids: tuple[int, ...]
    bos_id: int | None

    @abc.abstractmethod
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """text -> [n] ids; `add_special_tokens` adds what the tokenizer adds around a text (e.g. BOS)."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """[n] ids -> text."""

    @abc.abstractmethod
    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True, **variables) -> str:
        """messages ([{"role": ..., "content": ...}, ...]) -> the prompt text the model was tuned on."""

    @abc.abstractmethod
    def stream_decoder(self, *, skip_special_tokens: bool = True) -> StreamDecoder:
        """A fresh `StreamDecoder` whose output matches `decode(..., skip_special_tokens=...)`."""

    def encode_chat(self, prompt: str) -> list[int]:
        """A chat-formatted prompt (from `apply_chat_template`) -> [n] ids, no special tokens added.

        The template writes BOS itself when the model wants one, as in transformers.
        """
        return self.encode(prompt, add_special_tokens=False)


class ByteTokenizer(Tokenizer):
    """jmoe's byte-level models: ids are the UTF-8 bytes of the text; no BOS, EOS or chat template.

    `vocab_size` may exceed 256 (a model's embedding can be larger); ids >= 256 decode to nothing.
    """

    eos_ids = ()
    bos_id = None

    def __init__(self, vocab_size: int = 256):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256:
            raise ValueError(f"vocab_size={vocab_size!r} must be an integer >= 256 for byte-level ids")
        self.vocab_size = vocab_size

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in _ids_list(ids) if 0 <= i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True, **variables) -> str:
        raise ValueError("ByteTokenizer has no chat template; load a Hugging Face tokenizer directory for chat prompts")

    def stream_decoder(self, *, skip_special_tokens: bool = True) -> StreamDecoder:
        return _ByteStream()


# ---------------------------------------------------------------------------------------------
# Chat templates, compiled as transformers' `_compile_jinja_template` does.


class _TemplateRaised(Exception):
    """`raise_exception(message)` called by a template."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks the model's turns for training masks): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise _TemplateRaised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; templates expect plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    # `dict(...)` and `dict.fromkeys(...)` without exposing the dict type itself to the sandbox
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    return env.from_string(source)


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts with 'role' and 'content', got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty; a chat needs at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        # as transformers: a key set to None is left out (templates handle a missing key, not a None)
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def render_chat_template(
    template: str, messages: list[dict], *, add_generation_prompt: bool = True, origin: str = "chat template", **variables
) -> str:
    """Render a Hugging Face chat template exactly as `transformers`' `apply_chat_template(tokenize=False)`.

    `variables` are the tokenizer's special tokens (`bos_token`, `eos_token`, ...) and any extra
    template switches (`enable_thinking=False`, `tools=[...]`). Errors, including a template's
    own `raise_exception(...)`, are one-line ValueErrors that start with `origin`.
    """
    if not isinstance(template, str):
        raise ValueError(f"{origin} must be a string, got {type(template).__name__}")
    messages = _check_messages(messages)
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{origin} does not compile: {_one_line(e.message or e)} (line {e.lineno})") from None
    tools = variables.pop("tools", None)
    documents = variables.pop("documents", None)
    try:
        return compiled.render(
            messages=messages,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except _TemplateRaised as e:
        raise ValueError(f"{origin}: {_one_line(e)}") from None
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
        raise ValueError(f"{origin} failed to render: {type(e).__name__}: {_one_line(e)}") from None


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer directories.


def _read_json(path: Path, required: bool = False) -> dict | None:
    if not path.is_file():
        if required:
            raise ValueError(f"{path} does not exist")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except (UnicodeDecodeError, OSError) as e:
        raise ValueError(f"{path} cannot be read: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _id_list(data: dict | None, key: str, path: Path) -> list[int]:
    value = None if data is None else data.get(key)
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{path}: {key}={value!r} must be a token id or a list of token ids")
    return values


def _token_text(data: dict | None, key: str, path: Path) -> str | None:
    value = None if data is None else data.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # a saved AddedToken
        return value["content"]
    raise ValueError(f"{path}: {key}={_one_line(repr(value))} must be a string or an AddedToken with 'content'")


def _chat_template(directory: Path, config: dict | None) -> tuple[str | None, str]:
    """The directory's chat template and, when there is none, why."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8"), ""
        except (UnicodeDecodeError, OSError) as e:
            raise ValueError(f"{jinja_file} cannot be read: {_one_line(e)}") from None
    path = directory / "tokenizer_config.json"
    value = None if config is None else config.get("chat_template")
    if value is None:
        return None, "no chat_template.jinja and no chat_template in tokenizer_config.json"
    if isinstance(value, str):
        return value, ""
    if isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value
    ):
        named = {t["name"]: t["template"] for t in value}
        if "default" in named:
            return named["default"], ""
        return None, f"several chat templates ({', '.join(sorted(named))}) in {path} and none named 'default'"
    raise ValueError(f"{path}: chat_template must be a string or a list of {{'name', 'template'}} objects")


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` with the special ids and chat template of its model directory.

    Build one with `HFTokenizer.from_dir(path)`. `encode` adds special tokens through the
    tokenizer's own post-processor (how transformers adds BOS); `decode` skips special tokens
    unless told not to.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        eos_ids: Sequence[int] = (),
        bos_id: int | None = None,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        name: str = "tokenizer",
        no_template_reason: str = "no chat template was given",
    ):
        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise ValueError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self._tok = tokenizer
        # transformers encodes without the truncation or padding a tokenizer.json may carry
        self._tok.no_truncation()
        self._tok.no_padding()
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))
        self.bos_id = None if bos_id is None else int(bos_id)
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.name = name
        self._no_template_reason = no_template_reason

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_ids={self.eos_ids}, bos_id={self.bos_id})"

    @classmethod
    def from_dir(cls, path: str | Path) -> "HFTokenizer":
        """A Hugging Face model directory: tokenizer.json (required), tokenizer_config.json,
        chat_template.jinja, special_tokens_map.json, generation_config.json and config.json (optional).

        `eos_ids` is the union, in this order, of generation_config.json's `eos_token_id`,
        config.json's `eos_token_id` and the id of tokenizer_config.json's `eos_token`.
        """
        directory = Path(path)
        tok_file = directory / "tokenizer.json"
        if not directory.is_dir():
            raise ValueError(f"{directory} is not a directory")
        if not tok_file.is_file():
            raise ValueError(
                f"{directory} has no tokenizer.json; save one there with transformers' tokenizer.save_pretrained"
            )
        _read_json(tok_file, required=True)  # a clear message for broken JSON before tokenizers' own
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception
            raise ValueError(f"{tok_file} is not a tokenizers file: {_one_line(e)}") from None

        config_file = directory / "tokenizer_config.json"
        tok_config = _read_json(config_file)
        special_map_file = directory / "special_tokens_map.json"
        special_map = _read_json(special_map_file)
        gen_file, model_file = directory / "generation_config.json", directory / "config.json"
        gen_config, model_config = _read_json(gen_file), _read_json(model_file)

        special = {}
        for key in SPECIAL_TOKEN_NAMES:
            text = _token_text(tok_config, key, config_file)
            if text is None:  # the legacy file is read only where tokenizer_config.json says nothing
                text = _token_text(special_map, key, special_map_file)
            if text is not None:
                special[key] = text

        eos = _id_list(gen_config, "eos_token_id", gen_file) + _id_list(model_config, "eos_token_id", model_file)
        if "eos_token" in special and tok.token_to_id(special["eos_token"]) is not None:
            eos.append(tok.token_to_id(special["eos_token"]))
        bos_id = tok.token_to_id(special["bos_token"]) if "bos_token" in special else None
        if bos_id is None:
            bos_ids = _id_list(model_config, "bos_token_id", model_file) + _id_list(gen_config, "bos_token_id", gen_file)
            bos_id = bos_ids[0] if bos_ids else None

        template, reason = _chat_template(directory, tok_config)
        return cls(
            tok,
            eos_ids=eos,
            bos_id=bos_id,
            chat_template=template,
            special_tokens=special,
            name=str(directory),
            no_template_reason=reason,
        )

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([i for i in _ids_list(ids) if i >= 0], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True, **variables) -> str:
        """messages -> prompt text, rendered as transformers does; `variables` override the special tokens."""
        if self.chat_template is None:
            raise ValueError(f"{self.name} has no chat template: {self._no_template_reason}")
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            origin=f"chat template of {self.name}",
            **{**self.special_tokens, **variables},
        )

    def stream_decoder(self, *, skip_special_tokens: bool = True) -> StreamDecoder:
        return _WindowStream(functools.partial(self.decode, skip_special_tokens=skip_special_tokens))


def load_tokenizer(path: str | Path | None, *, vocab_size: int = 256) -> Tokenizer:
    """None -> `ByteTokenizer(vocab_size)`; a Hugging Face model directory -> `HFTokenizer`.

    Reads local files only. Missing or broken files are one-line ValueErrors naming the file.
    """
    if path is None:
        return ByteTokenizer(vocab_size)
    if not isinstance(path, (str, Path)) or str(path) == "":
        raise ValueError(f"tokenizer path must be a directory path or None, got {path!r}")
    directory = Path(path).expanduser()
    if not directory.exists():
        raise ValueError(f"tokenizer directory {directory} does not exist")
    return HFTokenizer.from_dir(directory)
