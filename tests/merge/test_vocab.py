"""`tokenizer_source` of a merge configuration: the output vocabulary (base, union, a model's)
and every model's embedding rows moved to it by token, as mergekit does."""

import json

import numpy as np
import pytest

pytest.importorskip("tokenizers")
from tokenizers import AddedToken, Tokenizer  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from tokenizers.pre_tokenizers import Whitespace  # noqa: E402

from jmoe import merge  # noqa: E402
from jmoe.cli import main  # noqa: E402
from jmoe.io import load_safetensors, save_safetensors  # noqa: E402

D = 4
VOCABS = {  # normal tokens, then special added tokens
    "base": (["<unk>", "a", "b", "c"], ["<s>"]),
    "ft0": (["<unk>", "a", "b", "c"], ["<s>"]),
    "ft1": (["<unk>", "c", "a", "e"], ["<s>", "<t>"]),
    "ft2": (["<unk>", "b", "e", "z"], ["<s>"]),
}


def make(dir_, name, seed):
    words, special = VOCABS[name]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True) for s in special])
    dir_.mkdir()
    tok.save(str(dir_ / "tokenizer.json"))
    v = len(words) + len(special)
    rng = np.random.default_rng(seed)
    tree = {"model.embed_tokens.weight": rng.standard_normal((v, D)).astype(np.float32),
            "lm_head.weight": rng.standard_normal((v, D)).astype(np.float32),
            "model.layers.0.mlp.up_proj.weight": rng.standard_normal((6, D)).astype(np.float32)}
    save_safetensors(tree, dir_)
    (dir_ / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1,
                                                  "vocab_size": v}))
    tokens = words + special
    return {"tree": tree, "row": {t: i for i, t in enumerate(tokens)}}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    return root, {n: make(root / n, n, i) for i, n in enumerate(VOCABS)}


def expected_rows(zoo_models, names, out_tokens, base=None):
    """Each model's embedding on out_tokens, by mergekit's rules written out token by token."""
    out = {}
    for tensor in ("model.embed_tokens.weight", "lm_head.weight"):
        for n in names:
            rows = []
            for t in out_tokens:
                m = zoo_models[n]
                if t in m["row"]:
                    rows.append(m["tree"][tensor][m["row"][t]])
                    continue
                have = [k for k in names if t in zoo_models[k]["row"]]
                if len(have) == 1:
                    src = have
                elif base is not None and t in zoo_models[base]["row"]:
                    src = [base]
                else:
                    src = have
                rows.append(np.mean([zoo_models[k]["tree"][tensor][zoo_models[k]["row"][t]] for k in src], 0)
                            if src else np.zeros(D, np.float32))
            out[(n, tensor)] = np.stack(rows)
    return out


def run(root, tmp_path, text):
    cfg = tmp_path / "merge.yml"
    cfg.write_text(text)
    out = tmp_path / "out"
    return main(["merge", str(cfg), str(out), "--quiet"]), out


def test_union_with_a_base(zoo, tmp_path):
    root, models = zoo
    models_yaml = ", ".join(f"{{model: {root}/{n}, parameters: {{weight: 1}}}}" for n in ("ft0", "ft1"))
    rc, out = run(root, tmp_path, f"merge_method: task_arithmetic\nbase_model: {root}/base\nmodels: [{models_yaml}]\n"
                                  f"parameters: {{lambda: 0.5}}\ntokenizer_source: union\n")
    assert rc == 0
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    # the base's vocabulary, then ft1's token e, then ft1's added token <t>
    assert tok.encode("a e <t> b").ids == [1, 5, 6, 2]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 7
    tokens = ["<unk>", "a", "b", "c", "<s>", "e", "<t>"]
    want = expected_rows(models, ["base", "ft0", "ft1"], tokens, base="base")
    got = load_safetensors(out, lazy=False)
    for tensor in ("model.embed_tokens.weight", "lm_head.weight"):
        b = {"w": want[("base", tensor)]}
        merged = merge.task_arithmetic(b, [{"w": want[("ft0", tensor)]}, {"w": want[("ft1", tensor)]}], lam=0.5)["w"]
        np.testing.assert_allclose(got[tensor], merged, rtol=1e-6, atol=1e-6)
    # written out by hand: e (output id 5) only ft1 has (its row 3), so every model takes ft1's
    # row and the merge is that row; ft1 lacks b (id 2) and takes the base's, a zero task vector
    for tensor in ("model.embed_tokens.weight", "lm_head.weight"):
        t = {n: models[n]["tree"][tensor] for n in models}
        np.testing.assert_allclose(got[tensor][5], t["ft1"][3], rtol=1e-6)
        np.testing.assert_allclose(got[tensor][2], t["base"][2] + 0.5 * (t["ft0"][2] - t["base"][2]), rtol=1e-6)
        np.testing.assert_allclose(got[tensor][1], t["base"][1] + 0.5 * (t["ft0"][1] - t["base"][1])
                                   + 0.5 * (t["ft1"][2] - t["base"][1]), rtol=1e-5, atol=1e-6)


def test_union_without_a_base_averages_and_base_and_model_sources(zoo, tmp_path):
    root, models = zoo
    names = ["ft0", "ft1", "ft2"]
    body = "merge_method: linear\nmodels: [" + ", ".join(f"{{model: {root}/{n}, parameters: {{weight: 1}}}}"
                                                         for n in names) + "]\n"
    for source, tokens in [("union", ["<unk>", "a", "b", "c", "<s>", "e", "z", "<t>"]),
                           ("base", ["<unk>", "a", "b", "c", "<s>"]),
                           (f"{root}/ft2", ["<unk>", "b", "e", "z", "<s>"])]:
        sub = tmp_path / source.replace("/", "_")
        sub.mkdir()
        rc, out = run(root, sub, body + f"tokenizer_source: {source}\n")
        assert rc == 0
        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        assert [tok.token_to_id(t) for t in tokens] == list(range(len(tokens)))
        want = expected_rows(models, names, tokens)
        got = load_safetensors(out, lazy=False)
        for tensor in ("model.embed_tokens.weight", "lm_head.weight"):
            np.testing.assert_allclose(got[tensor], np.mean([want[(n, tensor)] for n in names], 0), rtol=1e-6,
                                       atol=1e-6)
        np.testing.assert_allclose(got["model.layers.0.mlp.up_proj.weight"],
                                   np.mean([models[n]["tree"]["model.layers.0.mlp.up_proj.weight"] for n in names], 0),
                                   rtol=1e-6)
    # ft0 lacks e, which ft1 and ft2 have: without a base it takes their mean
    e = np.mean([models["ft1"]["tree"]["lm_head.weight"][3], models["ft2"]["tree"]["lm_head.weight"][2]], 0)
    np.testing.assert_allclose(expected_rows(models, names, ["e"])[("ft0", "lm_head.weight")][0], e)


def test_token_overrides_and_padding(zoo, tmp_path):
    """mergekit's tokenizer block: a token's rows from zeros, forced from one model, or copied
    from another token of a model (a token the vocabulary lacks is added), rows padded."""
    root, models = zoo
    models_yaml = ", ".join(f"{{model: {root}/{n}, parameters: {{weight: 1}}}}" for n in ("ft0", "ft1"))
    rc, out = run(root, tmp_path, f"""merge_method: task_arithmetic
base_model: {root}/base
models: [{models_yaml}]
parameters: {{lambda: 0.5}}
tokenizer:
  source: union
  pad_to_multiple_of: 16
  tokens:
    e: {{source: {{kind: zero}}}}
    a: {{source: {root}/ft1, force: true}}
    <new>: {{source: {{kind: model_token, model: {root}/ft0, token: b}}}}
""")
    assert rc == 0
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.token_to_id("<new>") == 7 and tok.get_vocab_size() == 8
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 16
    got = load_safetensors(out, lazy=False)
    for tensor in ("model.embed_tokens.weight", "lm_head.weight"):
        t = {n: models[n]["tree"][tensor] for n in models}
        assert got[tensor].shape == (16, D) and not got[tensor][8:].any()
        np.testing.assert_allclose(got[tensor][5], 0.5 * t["ft1"][3], rtol=1e-6)  # e: zeros where missing
        np.testing.assert_allclose(got[tensor][1], t["ft1"][2], rtol=1e-6)  # a: ft1's row for every model
        np.testing.assert_allclose(got[tensor][7], t["ft0"][2], rtol=1e-6)  # <new>: ft0's row of b


def test_bad_tokenizer_sources_are_one_line_errors(zoo, tmp_path, capsys):
    root, _ = zoo
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{}")
    cases = [(f"tokenizer_source: {tmp_path}/nowhere", "does not exist"),
             (f"tokenizer_source: {broken}", "not a readable tokenizer"),
             ("tokenizer_source: [1]", "must be 'base', 'union' or a model directory"),
             ("tokenizer_source: base\ntokenizer: {source: base}", "not both"),
             ("tokenizer: {source: union, tokens: {e: {source: {kind: zero}, weight: 1}}}", "unsupported key(s) weight"),
             (f"tokenizer: {{tokens: {{e: {{source: {root}/base}}}}}}", "is not part of the merge"),
             (f"tokenizer: {{tokens: {{b: {{source: {root}/ft1}}}}}}", "has no token 'b'"),
             (f"tokenizer: {{tokens: {{e: {{source: {{kind: model_token, model: {root}/ft0, token: e}}}}}}}}",
              "token 'e' is not in the vocabulary"),
             (f"tokenizer: {{tokens: {{e: {{source: {{kind: model_token, model: {root}/ft0, token: a, token_id: 1}}}}}}}}",
              "exactly one of token_id or token"),
             ("tokenizer: {pad_to_multiple_of: 0}", "pad_to_multiple_of=0")]
    for text, message in cases:
        rc, out = run(root, tmp_path, f"merge_method: linear\nmodels: [{{model: {root}/ft0, parameters: {{weight: 1}}}}, "
                                      f"{{model: {root}/ft1, parameters: {{weight: 1}}}}]\n{text}\n")
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and len(err.splitlines()) == 1, err
        assert not out.exists()


def bpe_model(dir_, seed, rows, config_vocab):
    """A model with a trained byte-level BPE tokenizer of 280 tokens, `rows` embedding rows and
    config vocab_size `config_vocab`."""
    from tokenizers import decoders, models as tok_models, pre_tokenizers, trainers

    tok = Tokenizer(tok_models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["def f(x): return x", "hello world", "the mixture of experts"] * 4,
                            trainer=trainers.BpeTrainer(
                                vocab_size=280, special_tokens=["<s>"], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.get_vocab_size() == 280
    dir_.mkdir()
    tok.save(str(dir_ / "tokenizer.json"))
    rng = np.random.default_rng(seed)
    tree = {"model.embed_tokens.weight": rng.standard_normal((rows, D)).astype(np.float32)}
    save_safetensors(tree, dir_)
    (dir_ / "config.json").write_text(json.dumps({"num_hidden_layers": 1, "vocab_size": config_vocab}))
    (dir_ / "vocab.json").write_text("{}")  # a slow-tokenizer file that a rebuilt vocabulary must not ship
    return tree["model.embed_tokens.weight"], tok


@pytest.mark.parametrize("rows, config_vocab, out_rows", [(270, 270, 270), (300, 300, 280)])
def test_base_vocabulary_is_stripped_past_vocab_size_or_drops_padding_rows(tmp_path, rows, config_vocab, out_rows):
    """A tokenizer with more tokens than the config's vocab_size loses them (its merges that
    make them too); a config padded past the tokenizer loses the padding rows (as mergekit)."""
    e0, tok = bpe_model(tmp_path / "m0", 0, rows, config_vocab)
    e1, _ = bpe_model(tmp_path / "m1", 1, rows, config_vocab)
    rc, out = run(tmp_path, tmp_path, f"merge_method: linear\nmodels: [{{model: {tmp_path}/m0, parameters: {{weight: 1}}}}, "
                                      f"{{model: {tmp_path}/m1, parameters: {{weight: 1}}}}]\ntokenizer_source: base\n")
    assert rc == 0
    got = load_safetensors(out, lazy=False)["model.embed_tokens.weight"]
    np.testing.assert_allclose(got, ((e0 + e1) / 2)[:out_rows], rtol=1e-6)
    merged_tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert merged_tok.get_vocab_size() == out_rows and json.loads((out / "config.json").read_text())["vocab_size"] == out_rows
    ids = merged_tok.encode("the mixture of experts: def f(x): return x").ids
    assert max(ids) < out_rows and merged_tok.decode(ids) == "the mixture of experts: def f(x): return x"
    data = json.loads((out / "tokenizer.json").read_text())
    kept = set(data["model"]["vocab"])
    assert all(all(p in kept for p in (m.split(" ") if isinstance(m, str) else m)) for m in data["model"]["merges"])
    assert not (out / "vocab.json").exists()
