"""Kill training runs at chosen points and restart them until they finish (tests/test_fault_injection.py).

Each launch is `python -m ofa_ufo.training`'s `main(argv)` in a child process forked from a
multiprocessing fork server that has already imported the library: a real process, killed with a
real SIGKILL, without paying ~8 s of imports per restart. A fault is either a seeded delay after
which the parent kills the child, or a named point where the child kills itself
(`OFA_UFO_FAULT_POINT`, `ofa_ufo.training.checkpoint.fault_point`): the library's checkpoint and
export points, plus "evaluation", which this harness fires on every module forward run without
gradients (evaluation is the only such forward in these runs), so "evaluation:N" dies mid-evaluation.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from tqdm import tqdm

from ofa_ufo.training import checkpoint as ckpt
from ofa_ufo.training.__main__ import main

EVALUATION = "evaluation"
# the kinds of fault a plan cycles through: the named points, then a kill after a random delay.
# write.swapping is left out: a run resumed with "auto" never rewrites a checkpoint it has (see
# test_replacing_a_checkpoint_killed_between_its_renames_puts_the_old_one_back)
KINDS = (*(p for p in ckpt.FAULT_POINTS if p != "write.swapping"), EVALUATION, "delay")
# the largest hit count drawn per point: enough to land on later saves or evaluations (an evaluation
# of these runs is ~700 module forwards), small enough that a launch usually gets there (a point it
# never reaches lets that launch finish)
MAX_HITS = {"checkpoint.weights_written": 3, "write.files_written": 3, "write.before_rename": 3,
            "write.renamed": 3, "checkpoint.pruning": 2, "export.moving": 6, EVALUATION: 1400}
MAX_DELAY_S = 4.0  # a launch on an idle machine takes ~2-5 s
LAUNCH_TIMEOUT_S = 300.0
STEP_LINE = re.compile(r"step (\d+)/\d+ loss")  # tqdm's \r-ended bar may precede it on a line
RESUMED_LINE = re.compile(r"resumed from (\S+) at step (\d+)")


def fault_plan(seed: int, faults: int) -> list[str]:
    """`faults` faults for run `seed`: the kinds rotate with the seed (runs 0-2 of 3 faults each cover all
    eight), hit counts and delays are drawn from the seed."""
    rng = random.Random(seed)
    plan = []
    for i in range(faults):
        kind = KINDS[(seed * faults + i) % len(KINDS)]
        if kind == "delay":
            plan.append(f"delay:{rng.uniform(0.3, MAX_DELAY_S):.2f}")
        else:
            plan.append(f"{kind}:{rng.randint(1, MAX_HITS[kind])}")
    return plan


# ---- the child process -------------------------------------------------------------------


def _evaluation_hook(module, args) -> None:
    if not torch.is_grad_enabled():  # generation and scoring run under no_grad / inference_mode
        ckpt.fault_point(EVALUATION)


def _child(argv: list[str], fault: str, log_path: str) -> None:
    """Run the trainer's command line with stdout and stderr going to `log_path`."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.update({"CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"})
    if fault and not fault.startswith("delay:"):
        os.environ[ckpt.FAULT_ENV] = fault
    torch.nn.modules.module.register_module_forward_pre_hook(_evaluation_hook)
    tqdm.set_lock(threading.RLock())  # its default, a multiprocessing semaphore, would leak at every kill
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


_CONTEXT: multiprocessing.context.BaseContext | None = None


def _context() -> multiprocessing.context.BaseContext:
    """The fork server (started once per test session), with the trainer imported before any fork."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["ofa_ufo.training.__main__"])  # not this module: 3.11 ignores sys.path there
    return _CONTEXT


# ---- launches and runs -------------------------------------------------------------------


@dataclass
class Launch:
    fault: str
    returncode: int
    log: str

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    @property
    def resumed_step(self) -> int | None:
        found = RESUMED_LINE.search(self.log)
        return int(found.group(2)) if found else None

    @property
    def steps_trained(self) -> int:
        """Steps this launch trained (one `step k/N` line each, log_every=1)."""
        return len(STEP_LINE.findall(self.log))


def launch(argv: list[str], fault: str, log_path: Path) -> Launch:
    """One run of the trainer: killed by the parent after a `delay:SECONDS` fault, or by itself at a
    named point; otherwise it runs to its end."""
    log_path.write_text("")
    process = _context().Process(target=_child, args=(argv, fault, str(log_path)))
    process.start()
    if fault.startswith("delay:"):
        process.join(float(fault.split(":")[1]))
        if process.is_alive():
            process.kill()
    process.join(LAUNCH_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        process.join()
        raise AssertionError(f"launch with fault {fault!r} hung for {LAUNCH_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
    return Launch(fault, process.exitcode, log_path.read_text())


@dataclass
class FaultRun:
    """The launches of one run, from the first to the one that finished."""

    launches: list[Launch] = field(default_factory=list)

    @property
    def kills(self) -> int:
        return sum(launch.killed for launch in self.launches)

    @property
    def resumes(self) -> int:
        return sum(launch.resumed_step is not None for launch in self.launches)

    def steps_recomputed(self, max_steps: int) -> int:
        """Steps trained more than once: work a kill threw away (a step killed before its line was
        printed is not counted)."""
        return sum(launch.steps_trained for launch in self.launches) - max_steps


def run_with_faults(argv: list[str], plan: list[str], log_dir: Path, after_kill: Callable[[], int | None],
                    max_launches: int = 12) -> FaultRun:
    """Launch with each fault of `plan` in turn, then without faults until the run exits 0. After each
    kill, `after_kill()` checks what is on disk and returns the step the next launch must resume from
    (None: start over); every restart is checked against it."""
    run, expected = FaultRun(), None
    for index in range(max_launches):
        done = launch(argv, plan[index] if index < len(plan) else "", log_dir / f"launch{index}.log")
        run.launches.append(done)
        if done.resumed_step is not None or not done.killed:  # else killed before it could say where it resumed
            assert done.resumed_step == expected, (f"launch {index} resumed at step {done.resumed_step}, the newest "
                                                    f"complete checkpoint is step {expected}:\n{done.log[-3000:]}")
        if done.returncode == 0:
            return run
        assert done.killed, f"launch {index} ({done.fault}) exited {done.returncode}:\n{done.log[-3000:]}"
        expected = after_kill()
    raise AssertionError(f"the run did not finish in {max_launches} launches")


# ---- what a checkpoint must hold ---------------------------------------------------------


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(trainer state, weights) of a checkpoint, every file read in full: the safetensors files
    tensor by tensor, the trainer state with the restricted unpickler, every JSON and YAML file
    parsed. Raises on anything missing or partial."""
    for file in path.rglob("*.json"):
        json.loads(file.read_text())
    yaml.safe_load((path / ckpt.CONFIG_FILE).read_text())
    state = torch.load(path / ckpt.STATE_FILE, map_location="cpu", weights_only=True)
    for file in path.glob("*.safetensors"):
        load_file(file)
    return state, load_file(path / ckpt.WEIGHTS_FILE)


def step_of(path: Path) -> int:
    return int(path.name.removeprefix(ckpt.PREFIX))


def as_argv(fields: dict) -> list[str]:
    """Command-line overrides (JSON is YAML) for config `fields`, resuming with "auto"."""
    return ["--resume", "auto", *(f"{key}={json.dumps(value)}" for key, value in fields.items())]


# ---- small children for direct tests of the fault points ---------------------------------


def in_child(target: Callable, args: tuple, fault: str) -> int:
    """Run `target(*args)` in a forked child with `OFA_UFO_FAULT_POINT=fault`; its exit code."""
    process = _context().Process(target=_with_fault, args=(target, args, fault))
    process.start()
    process.join(LAUNCH_TIMEOUT_S)
    return process.exitcode


def _with_fault(target: Callable, args: tuple, fault: str) -> None:
    os.environ[ckpt.FAULT_ENV] = fault
    target(*args)


def replace_checkpoint_file(final: str, data: bytes) -> None:
    """Rewrite checkpoint directory `final` (which exists) with one file holding `data`."""
    ckpt.write_atomically(Path(final), lambda tmp: (tmp / "weights.bin").write_bytes(data))


def reach_fault_point(name: str, times: int) -> None:
    for _ in range(times):
        ckpt.fault_point(name)
