"""`--plan` (`ofa_ufo.training.plan`): parameter counts, batch arithmetic, memory bytes, data counting,
the launch commands, and the printed commands run as printed (two CPU processes, gloo, two steps).

The equivalence of 1 and 2 processes (torchrun, DDP on gloo) is tested in test_training.py
(`test_two_processes_match_one`); here the commands the plan prints are launched as they are.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY

import ofa_ufo
from ofa_ufo.layers import normformer
from ofa_ufo.training.__main__ import main
from ofa_ufo.training.config import ConfigError, config_from_dict
from ofa_ufo.training.plan import (
    FSDP_CONFIG, FSDP_FROM_PARAMETERS, Cluster, Plan, _SavedTensors, count_examples, count_model, grad_accum_for,
    launch_command, static_bytes, steps_per_epoch,
)

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**fields):
    base = dict(model_overrides=dict(TINY), tasks={"caption": 1}, batch_size=4, max_steps=2, eval_examples=0,
                demo_train_scenes=64, log_every=1, num_threads=1, precision="fp32")
    return config_from_dict({**base, **fields}, "test")


def plan_of(parameters: int, cluster: Cluster, micro: int = 4, accum: int = 4, overrides=()) -> Plan:
    return Plan("pretrain_ofa_base", list(overrides), cluster, micro, accum, micro * cluster.world * accum, 256,
                parameters, parameters, parameters, None, None)


# ---- counts and arithmetic -------------------------------------------------------------------------------


def test_parameter_count_equals_the_models_own_count():
    torch.manual_seed(0)
    model = ofa_ufo.create_model("ofa_ufo_tiny", **TINY)
    expected = model.num_parameters()  # transformers' count, tied embedding once
    stem = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.encoder.embed_images"))
    assert 0 < stem < expected
    total, trainable, optimized = count_model(tiny_config())
    assert (total, trainable, optimized) == (expected, expected, expected)
    total, trainable, _ = count_model(tiny_config(freeze=["model.encoder.embed_images"]))
    assert (total, trainable) == (expected, expected - stem)


@pytest.mark.parametrize("global_batch, micro, world, expected", [
    (256, 4, 16, (4, 256)),  # 64 per pass, 4 passes
    (256, 2, 16, (8, 256)),
    (256, 3, 16, (6, 288)),  # 48 per pass: 5 give 240 < 256, so 6
    (256, 32, 16, (1, 512)),  # one pass already exceeds the global batch
    (7, 1, 1, (7, 7)),
])
def test_grad_accum_reaches_the_global_batch(global_batch, micro, world, expected):
    assert grad_accum_for(global_batch, micro, world) == expected


def test_grad_accum_refuses_empty_batches():
    with pytest.raises(ConfigError, match="must be >= 1, got 256, 0, 16"):
        grad_accum_for(256, 0, 16)
    with pytest.raises(ConfigError, match="--nodes and --gpus must be >= 1, got nodes=0 gpus=8"):
        Cluster(0, 8)


def test_steps_per_epoch_and_static_memory_by_hand():
    assert [steps_per_epoch(n, 256) for n in (1, 256, 1024, 1025)] == [1, 1, 4, 5]
    # 10 parameters, 6 trainable: 4 bytes each, 4 per gradient, 8 per pair of AdamW moments
    assert static_bytes(10, 6) == {"weights": 40, "gradients": 24, "adamw": 48}
    assert static_bytes(10, 6, world=4) == {"weights": 40, "gradients": 24, "adamw": 48}  # replicated
    assert static_bytes(10, 6, world=4, sharded=True) == {"weights": 10, "gradients": 6, "adamw": 12}


def test_saved_tensor_count_of_a_known_module():
    """Linear keeps its input (3 x 10) and its weight (a parameter: not counted); ReLU its output (3 x 20)."""
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU())
    saved = _SavedTensors(model)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
        model(torch.randn(3, 10)).sum().backward()
    assert saved.total == 3 * 10 * 4 + 3 * 20 * 4


def test_examples_are_counted_from_lines_and_demo_settings(tmp_path, monkeypatch):
    (tmp_path / "caption.jsonl").write_text("{}\n{}\n{}")  # 3 records, the last without a newline
    shards = tmp_path / "vqa"
    shards.mkdir()
    (shards / "a.jsonl").write_text("{}\n" * 4)
    (shards / "b.jsonl").write_text("{}\n" * 5)
    monkeypatch.setenv("PLAN_DATA", str(tmp_path))
    data = {"caption": "${PLAN_DATA}/caption.jsonl", "vqa": str(shards) + "/"}
    config = tiny_config(tasks={"caption": 1, "vqa": 1, "grounding": 1}, data=data, demo_train_scenes=100)
    assert count_examples(config) == 3 + 9 + 100  # grounding: the generated scenes
    monkeypatch.delenv("PLAN_DATA")
    assert count_examples(config) is None  # an unset variable: pass --examples
    (tmp_path / "s.tar").write_bytes(b"")
    assert count_examples(tiny_config(data={"caption": str(tmp_path / "s.tar")})) is None


# ---- launch commands -------------------------------------------------------------------------------------


def test_launch_commands_for_two_nodes_of_eight_gpus():
    ddp = plan_of(150_000_000, Cluster(2, 8), micro=2, accum=8, overrides=["max_steps=10", "tasks={caption: 1}"])
    assert launch_command(ddp) == (
        "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:29500 "
        "--rdzv-id $JOB_ID -m ofa_ufo.training --config pretrain_ofa_base max_steps=10 'tasks={caption: 1}' "
        "batch_size=32 grad_accum=8")
    fsdp = plan_of(430_000_000, Cluster(2, 8), micro=1, accum=16)
    assert launch_command(fsdp) == (
        "accelerate launch --config_file run_scripts/accelerate_fsdp.yaml --num_machines 2 --num_processes 16 "
        "--machine_rank $NODE_RANK --main_process_ip $MASTER_ADDR --main_process_port 29500 "
        "-m ofa_ufo.training --config pretrain_ofa_base batch_size=16 grad_accum=16")
    assert launch_command(plan_of(150_000_000, Cluster(1, 8))).startswith("torchrun --standalone --nproc-per-node 8 -m")


def test_fsdp_config_wraps_layers_that_exist():
    config = yaml.safe_load((REPO / FSDP_CONFIG).read_text())
    assert config["distributed_type"] == "FSDP"
    wrapped = config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(",")
    assert wrapped and all(isinstance(getattr(normformer, name), type) for name in wrapped)
    model = ofa_ufo.create_model("ofa_ufo_tiny", **TINY)
    assert {type(m).__name__ for m in model.modules()} >= set(wrapped)


def test_cli_plan_prints_the_plan(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output_dir, checkpoints/run, is relative: nothing may appear there
    overrides = [f"model_overrides={json.dumps(dict(TINY))}", "tasks={caption: 1, vqa: 1}", "batch_size=8",
                 "grad_accum=4", "demo_train_scenes=500", "num_threads=1", "precision=fp32"]
    assert main(["--plan", "--nodes", "2", "--gpus", "2", "--micro-batch", "3", *overrides]) == 0
    out = capsys.readouterr().out
    assert "plan for (defaults) on 2 node(s) x 2 GPU(s) = 4 process(es)" in out
    assert "batch: 3 per process x 4 processes x grad_accum 3 = 36 per step (config: 32)" in out
    assert "steps per epoch: 28 (1,000 examples / 36 per step)" in out  # 500 scenes per task, 2 tasks
    assert "throughput here:" in out and "activations ~" in out
    assert "torchrun --nnodes 2 --nproc-per-node 2 " in out and "-m ofa_ufo.training 'model_overrides=" in out
    assert "--config" not in out and "batch_size=12 grad_accum=3" in out  # the defaults: no --config to repeat
    assert list(tmp_path.iterdir()) == []


def test_cli_plan_refuses_bad_sizes(capsys):
    assert main(["--plan", "--nodes", "0", "tasks={caption: 1}"]) == 2
    assert "--nodes and --gpus must be >= 1, got nodes=0 gpus=1" in capsys.readouterr().err
    assert main(["--plan", "--micro-batch", "0", "tasks={caption: 1}"]) == 2
    assert "--micro-batch must be >= 1, got 0" in capsys.readouterr().err


# ---- the printed commands, run on two CPU processes ----------------------------------------------------------


def run_printed(command: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run a launch command as printed, its launcher as this interpreter's module (no PATH lookup)."""
    launchers = {"torchrun": ["-m", "torch.distributed.run"], "accelerate": ["-m", "accelerate.commands.launch"]}
    words = shlex.split(command)
    words = [sys.executable, *launchers[words[0]], *words[2 if words[0] == "accelerate" else 1:]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(tmp_path / "hf")}
    return subprocess.run(words, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.xdist_group("processes")  # two processes of their own: one such test at a time
@pytest.mark.parametrize("parameters", [1_000, FSDP_FROM_PARAMETERS], ids=["torchrun", "accelerate_fsdp"])
def test_printed_launch_command_trains_two_steps_on_two_processes(tmp_path, parameters):
    """accelerate has no FSDP on CPU processes (MULTI_CPU): under the FSDP config file they train as DDP, so
    this checks the command, the config file and the trainer under the launcher, not the sharding."""
    config = tiny_config(output_dir=str(tmp_path / "run"))
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(config.to_yaml())
    plan = Plan(str(config_file), ["--resume", "never"], Cluster(1, 2), 2, 1, 4, 4, parameters, parameters,
                parameters, None, None)
    done = run_printed(launch_command(plan), tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count(f"config {config_file}") == 2, done.stdout  # two processes parsed it
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["losses"]) == 2


FSDP_WORKER = '''
import functools, json, os, sys
import torch, torch.distributed as dist, yaml
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
import ofa_ufo
from ofa_ufo.layers import normformer

fsdp_config = yaml.safe_load(open(sys.argv[1]))["fsdp_config"]
dist.init_process_group("gloo")
torch.manual_seed(0)
model = ofa_ufo.create_model("ofa_ufo_tiny", **json.loads(sys.argv[2])).train()
keys = sorted(model.state_dict())
layers = {getattr(normformer, name) for name in fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")}
wrapped = FSDP(model, auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layers),
               use_orig_params=fsdp_config["fsdp_use_orig_params"], device_id=torch.device("cpu"))
ids = torch.randint(10, 100, (2, 6))
loss = wrapped(input_ids=ids, pixel_values=torch.randn(2, 3, 64, 64), labels=ids).loss
loss.backward()
norm = float(wrapped.clip_grad_norm_(5.0))
torch.optim.AdamW(wrapped.parameters()).step()
with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False)):
    gathered = sorted(wrapped.state_dict())
held = sum(p.numel() for p in wrapped.parameters())
result = {"loss": float(loss), "norm": norm, "held": held, "keys_match": gathered == keys}
open(os.path.join(sys.argv[3], f"rank{dist.get_rank()}.json"), "w").write(json.dumps(result))
dist.destroy_process_group()
'''


@pytest.mark.xdist_group("processes")  # two processes of their own: one such test at a time
def test_model_shards_under_fsdp_with_the_shipped_wrap_policy(tmp_path):
    """accelerate runs no FSDP on CPU, so torch's FSDP wraps the tiny model directly, as the config file
    says, on two gloo processes: each holds half the weights; forward, backward, clipping, an AdamW step
    and the gathered full state dict work."""
    worker = tmp_path / "worker.py"
    worker.write_text(FSDP_WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
               str(REPO / FSDP_CONFIG), json.dumps(dict(TINY)), str(tmp_path)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "cannot be registered on non-leaf tensors" not in done.stderr  # the known failure (the xfail reason)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    torch.manual_seed(0)
    total = ofa_ufo.create_model("ofa_ufo_tiny", **TINY).num_parameters()
    assert all(r["keys_match"] for r in ranks)
    assert ranks[0]["held"] + ranks[1]["held"] == total and max(r["held"] for r in ranks) < total  # sharded
    assert ranks[0]["norm"] == pytest.approx(ranks[1]["norm"]) and math.isfinite(ranks[0]["loss"])
