"""Bad input to `jmoe train`, `eval`, `generate` and `plan` (flags, --set values, run
directories, checkpoints): exit code 2, one line on stderr, found before any expensive work,
and nothing on disk changed. (`jmoe merge` and `compress`: test_bad_input_merge_compress.py.)"""

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jmoe.cli import main
from jmoe.config import MoEConfig
from jmoe.dispatch.dropless import DroplessOptions
from jmoe.nn.transformer import LMConfig
from jmoe.options import _hints
from jmoe.routing.topk import TopKOptions
from jmoe.train.config import TrainConfig
from tests.train.conftest import MICRO, ROOT, lock_held


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny trained run with 8 experts per MoE layer (2 steps, one checkpoint at step 2)."""
    run = tmp_path_factory.mktemp("runs") / "src"
    assert main(["train", "--out", str(run), "--steps", "2", "--eval-every", "2", "--ckpt-every", "2", "--quiet",
                 *MICRO, "--set", "moe.num_experts=8"]) == 0
    return run


def snapshot(*roots) -> dict:
    """{path: sha256 of the content, or "dir"} of everything under `roots`."""
    out = {}
    for root in roots:
        out[str(root)] = "dir"
        for p in sorted(Path(root).rglob("*")):
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def unchanged(before: dict, after: dict) -> bool:
    """Whether the trees are the same, a run's lock file aside when it was there before."""
    locks = {p for p in before if Path(p).name == ".lock"}
    return {k: v for k, v in before.items() if k not in locks} == {k: v for k, v in after.items() if k not in locks}


@pytest.fixture
def no_expensive_work(monkeypatch):
    """Training, evaluation and sampling fail the test if bad input reaches them."""
    import jmoe.infer.engine
    import jmoe.train.trainer

    def forbidden(*args, **kwargs):
        raise AssertionError("bad input reached expensive work")

    monkeypatch.setattr(jmoe.train.trainer, "make_train_step", forbidden)
    monkeypatch.setattr(jmoe.train.trainer, "evaluate", forbidden)
    monkeypatch.setattr(jmoe.infer.engine.Engine, "generate", forbidden)


def run_cli(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse
        return e.code


# ------------------------------------------------------------------ damaged and foreign runs


def copy_run(tmp, run) -> Path:
    return Path(shutil.copytree(run, tmp / "copy"))


def state_dir(copy: Path) -> Path:
    return copy / "checkpoints" / "2" / "state"


def truncated_manifest(tmp, run) -> Path:
    copy = copy_run(tmp, run)
    f = state_dir(copy) / "manifest.ocdbt"
    f.write_bytes(f.read_bytes()[:60])
    return copy


def truncated_data(tmp, run) -> Path:
    copy = copy_run(tmp, run)
    for f in (state_dir(copy) / "ocdbt.process_0" / "d").iterdir():
        f.write_bytes(f.read_bytes()[:100])
    return copy


def more_experts(tmp, run) -> Path:
    """The run with a config of 16 experts per MoE layer (its checkpoint has 8)."""
    copy = copy_run(tmp, run)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model"]["moe"]["num_experts"] = 16
    (copy / "config.json").write_text(json.dumps(cfg, indent=1))
    return copy


def config_only(tmp, run) -> Path:
    """A directory with the run's config.json and no checkpoints."""
    (tmp / "half").mkdir()
    shutil.copy(run / "config.json", tmp / "half")
    return tmp / "half"


def a_file(tmp) -> Path:
    (tmp / "f").write_text("x")
    return tmp / "f"


def train_case(*flags, out="r"):
    return lambda tmp, run: ["train", "--out", str(tmp / out), "--quiet", *MICRO, *flags]


def on_copy(prepare, command, *flags):
    """argv of `jmoe <command>` on a prepared copy of the run (train: --resume into it)."""

    def build(tmp, run):
        copy = prepare(tmp, run)
        if command == "train":  # the run has 2 steps: 4 continues it
            return ["train", "--out", str(copy), "--resume", "--steps", "4", "--quiet"]
        return [command, "--ckpt", str(copy), *flags]

    return build


def read_case(command, *flags):
    return lambda tmp, run: [command, "--ckpt", str(run), *flags]


PLAN = ["plan", "--preset", "tiny", "--mesh", "data=2", "--hosts", "1", "--devices-per-host", "2"]

# (id, argv builder (tmp_path, run_dir) -> argv, text the error must contain)
CASES = [
    # train: --set values and flags
    ("lr fast", train_case("--set", "train.lr=fast"), "TrainConfig.lr='fast' must be a number"),
    ("block_size big", train_case("--set", "moe.dropless.block_size=big"), "block_size='big' must be an integer"),
    ("seed abc", train_case("--set", "train.seed=abc"), "TrainConfig.seed='abc' must be an integer"),
    ("grad_clip big", train_case("--set", "train.grad_clip=big"), "TrainConfig.grad_clip='big' must be a number"),
    ("renormalize maybe", train_case("--set", "moe.topk.renormalize=maybe"), "renormalize='maybe' must be true or false"),
    ("capacity option while dropless", train_case("--set", "moe.capacity.capacity_factor=2"),
     "'capacity' is not a method this layer selects"),
    ("unknown section", train_case("--set", "optim.lr=1"), "unknown section 'optim'"),
    ("unknown train field", train_case("--set", "train.learning_rate=1"), "TrainConfig has no field(s) learning_rate"),
    ("unknown moe field", train_case("--set", "moe.flavour=1"), "MoEConfig has no field(s) flavour"),
    ("unknown option", train_case("--set", "moe.topk.sharpness=1"), "has no option(s) sharpness"),
    ("not an assignment", train_case("--set", "train.lr"), "section.field=value"),
    ("steps 0", train_case("--steps", "0"), "TrainConfig.steps=0"),
    ("steps text", train_case("--steps", "many"), "invalid int value"),
    ("layer_moe of numbers", train_case("--set", 'model.layer_moe={"1": 2}'), "model.layer_moe"),
    ("distill from nowhere", train_case("--distill-from", "nowhere"), "nowhere is not a jmoe run directory"),
    ("resume from nowhere", train_case("--resume-from", "nowhere"), "nowhere is not a jmoe run directory"),
    ("distill from a run without checkpoints", lambda tmp, run: train_case("--distill-from", str(config_only(tmp, run)))(
        tmp, run), "has no checkpoints"),
    ("data missing", train_case("--data", "nowhere.txt"), "does not exist"),
    ("stop-after 0", train_case("--stop-after", "0"), "argument --stop-after: 0 must be >= 1"),
    ("out is a file", lambda tmp, run: train_case(out=a_file(tmp).name)(tmp, run), "is not a directory"),
    ("process id out of range", train_case("--coordinator", "127.0.0.1:1234", "--num-processes", "2",
                                           "--process-id", "2"), "--process-id 2 must be below --num-processes 2"),
    ("coordinator without port", train_case("--coordinator", "localhost", "--num-processes", "2",
                                            "--process-id", "0"), "must look like HOST:PORT"),
    ("num-processes alone", train_case("--num-processes", "2"), "need --coordinator"),
    ("cpu devices 0", train_case("--cpu-devices", "0"), "argument --cpu-devices: 0 must be >= 1"),
    ("new run over a run", lambda tmp, run: ["train", "--out", str(copy_run(tmp, run)), "--quiet", *MICRO],
     "already holds a run"),
    ("resume with other experts", lambda tmp, run: ["train", "--out", str(copy_run(tmp, run)), "--resume",
                                                    "--num-experts", "4", "--quiet"], "num_experts: 8 -> 4"),
    ("resume a damaged run", on_copy(truncated_manifest, "train"), "manifest.ocdbt"),
    ("fine-tune a damaged run", lambda tmp, run: ["train", "--out", str(tmp / "new" / "r"), "--quiet", "--resume-from",
                                                  str(truncated_manifest(tmp, run))], "manifest.ocdbt"),
    ("resume a run of another model", on_copy(more_experts, "train"), "do not match the run's config"),
    # eval
    ("eval missing dir", lambda tmp, run: ["eval", "--ckpt", str(tmp / "nowhere")], "is not a jmoe run directory"),
    ("eval no ckpt", lambda tmp, run: ["eval"], "the following arguments are required: --ckpt"),
    ("eval step missing", read_case("eval", "--step", "7"), "has no checkpoint at step 7 (have 2)"),
    ("eval step negative", read_case("eval", "--step", "-1"), "argument --step: -1 must be >= 0"),
    ("eval batches 0", read_case("eval", "--batches", "0"), "argument --batches: 0 must be in [1, 10000]"),
    ("eval batches absurd", read_case("eval", "--batches", "1000000000"), "must be in [1, 10000]"),
    ("eval data missing", read_case("eval", "--data", "nowhere.txt"), "does not exist"),
    ("eval truncated manifest", on_copy(truncated_manifest, "eval"), "manifest.ocdbt"),
    ("eval truncated data file", on_copy(truncated_data, "eval"), "is not valid for value of size 100"),
    ("eval 16 experts vs 8", on_copy(more_experts, "eval"),
     "moe/experts/w_down of shape (8, 32, 32), the config expects (16, 32, 32)"),
    # generate
    ("generate max-new-tokens -5", read_case("generate", "--max-new-tokens", "-5"),
     "argument --max-new-tokens: -5 must be in [1, 100000]"),
    ("generate max-new-tokens 0", read_case("generate", "--max-new-tokens", "0"), "must be in [1, 100000]"),
    ("generate max-new-tokens absurd", read_case("generate", "--max-new-tokens", "10000000000"), "must be in [1, 100000]"),
    ("generate temperature -1", read_case("generate", "--temperature", "-1"), "argument --temperature: -1"),
    ("generate temperature nan", read_case("generate", "--temperature", "nan"), "must be a finite number"),
    ("generate top-k -1", read_case("generate", "--top-k", "-1"), "argument --top-k: -1 must be >= 0"),
    ("generate top-k beyond vocab", read_case("generate", "--top-k", "257"), "exceeds the model's vocabulary of 256"),
    ("generate seed -1", read_case("generate", "--seed", "-1"), "argument --seed: -1"),
    ("generate step missing", read_case("generate", "--step", "3"), "has no checkpoint at step 3"),
    ("generate missing dir", lambda tmp, run: ["generate", "--ckpt", str(tmp / "nowhere")],
     "does not exist (want a jmoe run or a Hugging Face model directory)"),
    ("generate truncated manifest", on_copy(truncated_manifest, "generate"), "manifest.ocdbt"),
    ("generate 16 experts vs 8", on_copy(more_experts, "generate"), "do not match the run's config"),
    # plan
    ("plan hosts 0", lambda tmp, run: [*PLAN, "--hosts", "0"], "argument --hosts: 0 must be >= 1"),
    ("plan devices 0", lambda tmp, run: [*PLAN, "--devices-per-host", "0"], "argument --devices-per-host: 0"),
    ("plan memory 0", lambda tmp, run: [*PLAN, "--device-memory-gib", "0"], "argument --device-memory-gib: 0"),
    ("plan memory inf", lambda tmp, run: [*PLAN, "--device-memory-gib", "inf"], "must be a finite number"),
    ("plan mesh", lambda tmp, run: [*PLAN[:3], "--mesh", "data=two", *PLAN[5:]], "is not an integer"),
    ("plan mesh vs topology", lambda tmp, run: [*PLAN, "--hosts", "3"], "has 2 devices but the topology has 3 x 2"),
    ("plan preset", lambda tmp, run: [*PLAN, "--preset", "gigantic"], "unknown preset 'gigantic'"),
    ("plan lr fast", lambda tmp, run: [*PLAN, "--set", "train.lr=fast"], "TrainConfig.lr='fast'"),
]


@pytest.mark.parametrize("build, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(run_dir, tmp_path, capsys, no_expensive_work, build,
                                                         message):
    argv = build(tmp_path, run_dir)
    before = snapshot(tmp_path, run_dir)
    capsys.readouterr()
    code = run_cli(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    assert not out
    assert unchanged(before, snapshot(tmp_path, run_dir))


def test_a_second_writer_is_refused_with_the_holders_pid(run_dir, tmp_path, capsys, no_expensive_work):
    copy = copy_run(tmp_path, run_dir)
    with lock_held(copy) as holder:
        pid = holder.pid
        before = snapshot(tmp_path, run_dir)
        capsys.readouterr()
        for argv in (["train", "--out", str(copy), "--resume", "--quiet"],
                     ["train", "--out", str(copy), "--resume", "--steps", "4", "--quiet"]):
            assert run_cli(argv) == 2
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1, err
            assert f"is being written by process {pid}" in err, err
        assert unchanged(before, snapshot(tmp_path, run_dir))
        # a new run in a directory being written: refused too, before it is looked at
        assert run_cli(["train", "--out", str(copy), "--quiet", *MICRO]) == 2
        assert f"process {pid}" in capsys.readouterr().err
        assert unchanged(before, snapshot(tmp_path, run_dir))


def test_damaged_checkpoints_print_nothing_more_at_exit(run_dir, tmp_path):
    """The reads orbax leaves in flight when a restore fails must not report at exit."""
    copy = truncated_manifest(tmp_path, run_dir)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for _ in range(3):
        p = subprocess.run([sys.executable, "-m", "jmoe.cli", "eval", "--ckpt", str(copy)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 2
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr[:3000]
        assert p.stderr.startswith("jmoe eval: error: checkpoint") and "manifest.ocdbt" in p.stderr


# ------------------------------------------------------------------ --set fuzz


def _fields():
    """(key, type, field) of every --set field of model., moe., train. and of the default
    methods' options (moe.topk.*, moe.dropless.*)."""
    out = []
    for prefix, cls in (("model", LMConfig), ("moe", MoEConfig), ("train", TrainConfig),
                        ("moe.topk", TopKOptions), ("moe.dropless", DroplessOptions)):
        hints = _hints(cls)
        out += [(f"{prefix}.{f.name}", hints[f.name], f) for f in dataclasses.fields(cls)]
    return out


FIELDS = _fields()
# values of another type that a field takes on purpose: a mapping (converted), or null (the default)
ACCEPTS_DICT = {"model.moe", "model.attention", "model.meta", "model.layer_moe", "moe.router_options",
                "moe.dispatch_options", "moe.balance_options", "moe.routing_edit_options"}
ACCEPTS_NULL = {"model.moe", "model.dtype", "moe.dtype", "moe.router_options", "moe.dispatch_options",
                "moe.balance_options", "moe.routing_edit_options"}
DTYPES = {"model.dtype", "model.param_dtype", "moe.dtype", "moe.param_dtype"}

texts = st.text(max_size=8)
ints = st.integers(-10**6, 10**6)
floats = st.floats(allow_nan=False, allow_infinity=False, width=32)
non_integral = st.floats(-1e6, 1e6, allow_nan=False).filter(lambda x: not float(x).is_integer()) | st.sampled_from(
    [0.0, 1.0, 3.0, 64.0])  # floats for ints: 3.0 is a float too
lists = st.lists(ints, max_size=3)
dicts = st.dictionaries(st.text(max_size=4), ints, max_size=2)


def wrong_types(key: str, tp) -> st.SearchStrategy:
    """JSON values of a type field `key` (annotated `tp`) does not take."""
    args = set(typing.get_args(tp)) or {tp}
    optional = type(None) in args or key in ACCEPTS_NULL
    kinds = {"str": texts, "int": ints, "float": floats, "bool": st.booleans(), "list": lists, "dict": dicts}
    if int in args:
        keep = ["str", "bool", "list", "dict"]
        kinds["float"] = non_integral
        keep.append("float")
    elif float in args:
        keep = ["str", "bool", "list", "dict"]
    elif bool in args:
        keep = ["str", "int", "float", "list", "dict"]
    elif str in args:
        keep = ["int", "float", "bool", "list", "dict"]
    elif tuple in args:
        keep = ["str", "int", "float", "bool", "dict"]
    else:  # a config dataclass, the options of a method, or a dtype
        keep = ["int", "float", "bool", "list", "str", "dict"]
        if key in DTYPES:
            keep.remove("str")  # a dtype's name is a string
    if key in ACCEPTS_DICT:
        keep = [k for k in keep if k != "dict"]
    strategies = [kinds[k] for k in keep] + ([] if optional else [st.none()])
    return st.one_of(strategies)


def out_of_range(tp, meta) -> st.SearchStrategy | None:
    """Values of the right type outside a field's range or choices (None: it has neither)."""
    is_int = tp is int or int in typing.get_args(tp)
    cands = []
    step = st.integers(1, 10**6) if is_int else st.floats(1e-3, 1e6)
    for key, sign, inclusive in (("ge", -1, True), ("gt", -1, False), ("le", 1, True), ("lt", 1, False)):
        bound = meta.get(key)
        if bound is None:
            continue
        if is_int:  # beyond an inclusive bound by d >= 1, or from an exclusive bound on
            cands.append(step.map(lambda d, b=int(bound), s=sign, i=inclusive: b + s * (d if i else d - 1)))
        else:
            cands.append(step.map(lambda d, b=float(bound), s=sign: b + s * d))
            if not inclusive:
                cands.append(st.just(float(bound)))
    if cands and not is_int:
        cands.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    if meta.get("choices"):
        cands.append(texts.filter(lambda t, c=meta["choices"]: t not in c))
    return st.one_of(cands) if cands else None


def bad_values(key, tp, f) -> st.SearchStrategy:
    rng = out_of_range(tp, f.metadata)
    return wrong_types(key, tp) if rng is None else st.one_of(wrong_types(key, tp), rng)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("key, tp, f", FIELDS, ids=[k for k, _, _ in FIELDS])
def test_set_fuzz_names_the_field_and_writes_nothing(fuzz_dir, key, tp, f):
    @settings(max_examples=12, deadline=None, derandomize=True)
    @given(value=bad_values(key, tp, f))
    def check(value):
        argv = ["train", "--out", str(fuzz_dir / "r"), "--quiet", "--set", f"{key}={json.dumps(value)}"]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = run_cli(argv)
        err = err.getvalue()
        assert code == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1, (argv, err)
        assert f.name in err, (argv, err)
        assert not any(fuzz_dir.iterdir()), (argv, list(fuzz_dir.iterdir()))

    check()
