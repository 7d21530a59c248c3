"""`jmoe plan` and the multi-host launch recipes' dry runs (no accelerators needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jmoe.cli import main
from jmoe.nn import preset
from jmoe.parallel.plan import plan_run
from jmoe.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def test_plan_of_the_base_preset_on_4_hosts_x_8_chips(capsys):
    assert main(["plan", "--preset", "base", "--mesh", "data=4,expert=8", "--hosts", "4", "--devices-per-host", "8",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    experts = [l for l in plan["leaves"] if l["path"] == "params/layers/3/moe/experts/w_up"][0]
    assert experts["shape"] == [64, 1024, 512] and experts["per_device"] == [8, 1024, 512] and experts["spec"] == ["expert"]
    router = [l for l in plan["leaves"] if l["path"] == "params/layers/3/moe/router/w"][0]
    assert router["per_device"] == router["shape"]  # replicated
    mu = [l for l in plan["leaves"] if l["path"].endswith("mu/layers/3/moe/experts/w_up")][0]
    assert mu["per_device"] == [8, 1024, 512]  # the optimizer state is sharded like its parameter
    dev = plan["device_bytes"]
    assert dev["optimizer"] == 2 * dev["params"] and dev["total"] == sum(v for k, v in dev.items() if k != "total")
    assert plan["tokens_per_device"] == 256 * 2048 // 32


def test_a_placed_run_is_planned_with_its_experts_in_their_slots(capsys):
    args = ["plan", "--preset", "tiny", "--mesh", "expert=8", "--hosts", "1", "--devices-per-host", "8", "--json"]
    assert main(args + ["--set", "train.rebalance_every=10", "--set", "train.redundant_experts=8"]) == 0
    placed = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    leaf = lambda plan, end: [l for l in plan["leaves"] if l["path"].endswith(end)][0]
    assert leaf(placed, "params/layers/1/moe/experts/w_up")["shape"][0] == 16  # 8 experts + 8 redundant slots
    assert leaf(placed, "params/layers/1/moe/experts/w_up")["per_device"][0] == 2
    assert leaf(placed, "nu/layers/1/moe/experts/w_up")["per_device"][0] == 2
    assert leaf(plain, "params/layers/1/moe/experts/w_up")["per_device"][0] == 1
    assert placed["device_bytes"]["params"] > plain["device_bytes"]["params"]


def test_plan_errors_are_clear():
    p = preset("base")
    tc = TrainConfig(**p["train"])
    with pytest.raises(ValueError, match="has 32 devices but the topology has 2 x 8"):
        plan_run(p["model"], tc, "data=4,expert=8", hosts=2, devices_per_host=8)
    with pytest.raises(ValueError, match="num_experts=64 does not divide over expert=3"):
        plan_run(p["model"], tc.replace(batch_size=96), "data=2,expert=3", hosts=1, devices_per_host=6)
    with pytest.raises(ValueError, match="does not divide over the 32 token shards"):
        plan_run(p["model"], tc.replace(batch_size=48), "data=4,expert=8", hosts=4, devices_per_host=8)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_launch_recipe_dry_run(platform):
    script = ROOT / "experiments" / platform / "launch.sh"
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(["bash", str(script), "--dry-run"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "per-device memory" in out and "-> fits" in out and "experts/w_up" in out
    assert "jmoe train" in out  # the command each host would run
