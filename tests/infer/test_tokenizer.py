"""Tokenizers: byte-level ids, a Hugging Face directory built here, chat templates, streaming, errors."""

import json

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from jmoe.infer.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, render_chat_template

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>model\n{% endif %}"
)
# trim_blocks/lstrip_blocks, tojson, raise_exception, loopcontrols and bos_token, as real templates use them
RICH = """{{ bos_token }}
{% for m in messages %}
  {% if m.role not in ['system', 'user', 'model'] %}{{ raise_exception('Unknown role ' + m.role) }}{% endif %}
  {% if loop.index0 > 5 %}{% break %}{% endif %}
<|im_start|>{{ m.role }} {{ m | tojson }}
{% generation %}{{ m.content | trim }}{% endgeneration %}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>model
{% endif %}"""
SPECIALS = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
TEXT = "héllo wörld ✓ 日本"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "héllo <wörld> & \"quotes\" ✓"},
    {"role": "model", "content": "  hi  ", "tool_calls": None},
    {"role": "user", "content": "日本?"},
]


def _write(path, data):
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A byte-level BPE tokenizer with a BOS post-processor, as transformers saves one."""
    d = tmp_path_factory.mktemp("tok")
    tok = RawTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["hello world, hello there", "the world is wide", "wörld héllo"] * 3, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tok.save(str(d / "tokenizer.json"))
    _write(d / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "rstrip": False, "special": True},
        "unk_token": "<unk>",
        "chat_template": CHATML,
    })
    _write(d / "generation_config.json", {"eos_token_id": [tok.token_to_id("</s>"), tok.token_to_id("<|im_end|>")]})
    _write(d / "config.json", {"eos_token_id": tok.token_to_id("<unk>"), "bos_token_id": 0})
    return d


@pytest.fixture(scope="module")
def hf(hf_dir):
    return load_tokenizer(hf_dir)


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    """A sentencepiece-style (Llama) tokenizer: "▁" for spaces, byte fallback, one leading space stripped."""
    d = tmp_path_factory.mktemp("sp")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d", "ll", "▁w", "▁h"]:
        vocab[piece] = len(vocab)
    tok = RawTokenizer(models.BPE(vocab=vocab, merges=[("l", "l"), ("▁", "w"), ("▁", "h")], byte_fallback=True, unk_token="<unk>"))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(d / "tokenizer.json"))
    _write(d / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>"})
    return load_tokenizer(d)


def _copy(src, dst, **replace):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    for name, data in replace.items():
        name = name.replace("__", ".")
        if data is None:
            (dst / name).unlink()
        else:
            _write(dst / name, data)
    return dst


def test_byte_tokenizer_round_trip_and_large_ids():
    tok = load_tokenizer(None, vocab_size=300)
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 300
    assert (tok.eos_ids, tok.bos_id) == ((), None)
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode()) and max(ids) < 256
    assert tok.decode(ids) == TEXT
    assert tok.decode([104, 299, 105, 256]) == "hi"
    assert tok.decode([0xE6, 0x97]) == "\ufffd"
    with pytest.raises(ValueError, match="vocab_size=100 must be an integer >= 256"):
        ByteTokenizer(100)
    with pytest.raises(ValueError, match="ByteTokenizer has no chat template"):
        tok.apply_chat_template(MESSAGES)


def test_hf_round_trip_bos_and_special_ids(hf):
    assert isinstance(hf, HFTokenizer)
    assert hf.vocab_size == hf.backend.get_vocab_size(with_added_tokens=True)
    bos = hf.backend.token_to_id("<s>")
    ids = hf.encode(TEXT)
    assert ids[0] == bos == hf.bos_id
    assert hf.encode(TEXT, add_special_tokens=False) == ids[1:]
    assert bos not in ids[1:]
    assert hf.decode(ids) == TEXT
    assert hf.decode(ids, skip_special_tokens=False) == "<s>" + TEXT
    assert hf.decode(ids + [hf.vocab_size + 10]) == TEXT  # ids past the tokenizer (a padded model vocab) decode to nothing
    # generation_config first, then config.json, then tokenizer_config's eos_token; no repeats
    end, im_end, unk = (hf.backend.token_to_id(t) for t in ("</s>", "<|im_end|>", "<unk>"))
    assert hf.eos_ids == (end, im_end, unk)


def test_chat_prompt_encodes_without_added_bos(hf):
    prompt = hf.apply_chat_template(MESSAGES[:2])
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhéllo <wörld> & \"quotes\" ✓<|im_end|>\n"
        "<|im_start|>model\n"
    )
    ids = hf.encode_chat(prompt)
    assert ids[0] == hf.backend.token_to_id("<|im_start|>") and hf.bos_id not in ids
    assert hf.decode(ids, skip_special_tokens=False) == prompt
    assert not hf.apply_chat_template(MESSAGES[:1], add_generation_prompt=False).endswith("model\n")


def test_chat_template_and_ids_match_transformers(hf_dir, hf, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rich = _copy(hf_dir, tmp_path / "rich", chat_template__jinja=RICH)
    for d in (hf_dir, rich):
        ours = load_tokenizer(d)
        theirs = transformers.AutoTokenizer.from_pretrained(str(d))
        for gen in (True, False):
            want = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen) == want
        assert ours.encode_chat(want) == theirs.encode(want, add_special_tokens=False)
        for text in (TEXT, "hello world", ""):
            assert ours.encode(text) == theirs.encode(text)
            assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text), skip_special_tokens=True)


def test_chat_template_sources_and_errors(hf_dir, tmp_path):
    # chat_template.jinja wins over tokenizer_config.json
    jinja_file = "{{ messages | length }}|{{ eos_token }}"
    jinja = load_tokenizer(_copy(hf_dir, tmp_path / "jinja", chat_template__jinja=jinja_file))
    assert jinja.apply_chat_template(MESSAGES) == "4|<|im_end|>"
    # a list of named templates: the default one
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    templates = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ bos_token }}"}]
    named = load_tokenizer(_copy(hf_dir, tmp_path / "named", tokenizer_config__json=dict(config, chat_template=templates)))
    assert named.apply_chat_template(MESSAGES) == "D<s>"
    nodefault = dict(config, chat_template=[{"name": "tool_use", "template": "T"}])
    nodefault = load_tokenizer(_copy(hf_dir, tmp_path / "nodefault", tokenizer_config__json=nodefault))
    with pytest.raises(ValueError, match="several chat templates \\(tool_use\\) .* none named 'default'"):
        nodefault.apply_chat_template(MESSAGES)
    bare = load_tokenizer(_copy(hf_dir, tmp_path / "bare", tokenizer_config__json=None))
    # without tokenizer_config.json: config.json's bos_token_id, and no eos_token to add
    assert (bare.bos_id, len(bare.eos_ids)) == (0, 3)
    with pytest.raises(ValueError, match=r"bare has no chat template: no chat_template.jinja and no chat_template"):
        bare.apply_chat_template(MESSAGES)
    rich = load_tokenizer(_copy(hf_dir, tmp_path / "rich", chat_template__jinja=RICH))
    with pytest.raises(ValueError, match=r"^chat template of .*rich: Unknown role tool$"):
        rich.apply_chat_template(MESSAGES + [{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="messages is empty"):
        rich.apply_chat_template([])
    with pytest.raises(ValueError, match=r"messages\[1\] must be a dict"):
        rich.apply_chat_template([MESSAGES[0], "hi"])
    with pytest.raises(ValueError, match=r"^chat template does not compile: .*line 1"):
        render_chat_template("{% for m in messages %}", MESSAGES)


@pytest.mark.parametrize("kind", ["byte", "hf", "sp"])
def test_stream_decoding_one_id_at_a_time(kind, hf, sp):
    tok = {"byte": load_tokenizer(None), "hf": hf, "sp": sp}[kind]
    for text in (TEXT, "✓✓ 日本語 wörld", "a"):
        ids = tok.encode(text)
        if kind != "byte":
            assert any("\ufffd" in tok.decode([i]) for i in ids) or text == "a"  # characters really are split across ids
        stream = tok.stream_decoder()
        pieces = [stream.push([i]) for i in ids]
        pieces.append(stream.flush())
        assert "".join(pieces) == tok.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)
        assert pieces[-1] == ""  # valid text is all out before the flush
        # several ids per push, and an empty push
        stream = tok.stream_decoder()
        out = stream.push([]) + stream.push(ids[:3]) + stream.push(ids[3:]) + stream.flush()
        assert out == text


def test_stream_decoding_keeps_special_tokens_when_asked(hf):
    ids = hf.encode("hello world") + [hf.eos_ids[1]]
    stream = hf.stream_decoder(skip_special_tokens=False)
    assert "".join(stream.push([i]) for i in ids) + stream.flush() == "<s>hello world<|im_end|>"


def test_stream_flushes_invalid_bytes_as_replacement():
    stream = load_tokenizer(None).stream_decoder()
    assert stream.push([0x68, 0xE6, 0x97]) == "h"
    assert stream.flush() == "\ufffd"
    assert stream.push([0x69]) == "i"


def test_missing_and_broken_files_are_named(hf_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty has no tokenizer.json; "):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"nowhere does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    cases = {
        "tokenizer__json": ("{not json", r"tokenizer.json is not valid JSON: Expecting property name .*line 1, column 2"),
        "tokenizer_config__json": ('{"bos_token": "<s>",}', r"tokenizer_config.json is not valid JSON: "),
        "generation_config__json": ("[1, 2]", r"generation_config.json must hold a JSON object, got list"),
        "config__json": ('{"eos_token_id": "x"}', r"config.json: eos_token_id='x' must be a token id or a list of token ids"),
    }
    for i, (name, (content, message)) in enumerate(cases.items()):
        d = _copy(hf_dir, tmp_path / f"broken{i}", **{name: content})
        with pytest.raises(ValueError, match=message) as e:
            load_tokenizer(d)
        assert "\n" not in str(e.value)
    d = _copy(hf_dir, tmp_path / "notatokenizer", tokenizer__json={"model": {"type": "Nope"}})
    with pytest.raises(ValueError, match=r"tokenizer.json is not a tokenizers file: ") as e:
        load_tokenizer(d)
    assert "\n" not in str(e.value)
