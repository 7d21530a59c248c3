"""`jmoe generate` on a Hugging Face directory written here (no torch needed): batches from a
prompts file, --json, --stream, --chat, and bad input as one line with exit code 2 before
any weights are read."""

import json
import shutil

import jax
import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from jmoe.cli import main
from jmoe.infer import SamplingParams, load
from jmoe.io import hf
from jmoe.io.hf.architectures import mixtral
from jmoe.nn import init_lm
from tests.test_bad_input import snapshot, unchanged

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    tok = RawTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["def f(x): return x", "hello world", "the mixture of experts"] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHATML}))
    V = tok.get_vocab_size()
    cfg = mixtral(dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=48,
                       eos_token_id=1, bos_token_id=0))
    hf.save(d, cfg, init_lm(jax.random.key(0), cfg), architecture="mixtral")
    return d


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_batched_json_equals_the_python_api(hf_dir, tmp_path, capsys):
    prompts = ["def f(", "hello", "the mixture of experts is"]
    (tmp_path / "p.txt").write_text("\n".join(prompts[:2]) + "\n\n" + prompts[2] + "\n")
    code, out, err = run(["generate", "--ckpt", str(hf_dir), "--prompts-file", str(tmp_path / "p.txt"), "--json",
                          "--max-new-tokens", "6", "--temperature", "0", "--batch-size", "2", "--ignore-eos"], capsys)
    assert code == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert len(lines) == 4 and [x["prompt"] for x in lines[:3]] == prompts
    assert lines[3]["prefill_tokens_per_s"] > 0 and lines[3]["decode_tokens_per_s"] > 0
    model = load(hf_dir)
    gens, _ = model.generate_ids([model.encode(p) for p in prompts], max_new_tokens=6, stop_ids=())
    for line, g in zip(lines, gens):
        assert line["token_ids"] == list(g.token_ids) and len(line["token_ids"]) == 6
        assert line["text"] == model.tokenizer.decode(g.token_ids)
    assert "step" in err  # progress of a batch of several prompts


def test_stream_prints_the_same_text(hf_dir, capsys):
    args = ["generate", "--ckpt", str(hf_dir), "--prompt", "hello", "--max-new-tokens", "8", "--temperature", "0.9",
            "--top-p", "0.9", "--seed", "5", "--ignore-eos", "--quiet"]
    code, plain, _ = run(args, capsys)
    assert code == 0
    code, streamed, err = run(args + ["--stream"], capsys)
    assert code == 0 and streamed == plain and err == ""


def test_chat_uses_the_template(hf_dir, capsys):
    model = load(hf_dir)
    want = model.generate("hi there", chat=True, max_new_tokens=5, stop_ids=(),
                          sampling=SamplingParams(temperature=0.0))
    ids = model.encode("hi there", chat=True)
    assert ids[:1] == [model.tokenizer.encode("<|im_start|>", add_special_tokens=False)[0]]  # no BOS added
    code, out, _ = run(["generate", "--ckpt", str(hf_dir), "--prompt", "hi there", "--chat", "--max-new-tokens", "5",
                        "--temperature", "0", "--ignore-eos", "--quiet"], capsys)
    assert code == 0 and out == want + "\n"


def _without(src, tmp, name, content=None):
    d = tmp / "copy"
    shutil.copytree(src, d)
    if content is None:
        (d / name).unlink()
    else:
        (d / name).write_text(content)
    return d


@pytest.mark.parametrize("case, message", [
    ("no tokenizer", "has no tokenizer.json"),
    ("broken tokenizer", "tokenizer.json"),
    ("no chat template", "no chat template"),
    ("empty prompts file", "has no prompts"),
    ("too long", "context of 48 leaves no room"),
    ("stream several", "--stream prints one prompt"),
    ("step of hf", "has no checkpoint steps"),
    ("min-p 1", "--min-p"),
    ("stop id", "--stop-id 5000 is outside"),
    ("top-p 0", "argument --top-p"),
])
def test_bad_input_is_one_line_before_any_weights(case, message, hf_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hf, "load", lambda *a, **k: pytest.fail("weights were read"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "two.txt").write_text("a\nb\n")
    base = ["generate", "--ckpt", str(hf_dir), "--quiet"]
    argv = {
        "no tokenizer": lambda: ["generate", "--ckpt", str(_without(hf_dir, tmp_path, "tokenizer.json"))],
        "broken tokenizer": lambda: ["generate", "--ckpt", str(_without(hf_dir, tmp_path, "tokenizer.json", "{not json"))],
        "no chat template": lambda: ["generate", "--ckpt", str(_without(hf_dir, tmp_path, "tokenizer_config.json", "{}")), "--chat"],
        "empty prompts file": lambda: base + ["--prompts-file", str(tmp_path / "empty.txt")],
        "too long": lambda: base + ["--prompt", "hello world " * 40],
        "stream several": lambda: base + ["--prompts-file", str(tmp_path / "two.txt"), "--stream"],
        "step of hf": lambda: base + ["--step", "3"],
        "min-p 1": lambda: base + ["--min-p", "1"],
        "stop id": lambda: base + ["--stop-id", "5000"],
        "top-p 0": lambda: base + ["--top-p", "0"],
    }[case]()
    before = snapshot(tmp_path, hf_dir)
    code, out, err = run(argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert out == "" and unchanged(before, snapshot(tmp_path, hf_dir))


def test_truncate_keeps_the_last_tokens(hf_dir, capsys):
    code, out, err = run(["generate", "--ckpt", str(hf_dir), "--prompt", "hello world " * 40, "--truncate", "--json",
                          "--max-new-tokens", "4", "--temperature", "0", "--ignore-eos"], capsys)
    assert code == 0, err
    assert len(json.loads(out.splitlines()[0])["token_ids"]) == 4
