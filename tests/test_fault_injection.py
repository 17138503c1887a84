"""Faults during training (issue 31): runs SIGKILLed at random and at named points (inside checkpoint
writes, mid-evaluation, mid-export) and restarted until they finish, a full disk during a checkpoint
write, and corrupt checkpoints on resume.

The kill campaign (tests/fault_harness.py) checks, after every kill, that each checkpoint
`list_checkpoints` returns reads in full and lies on the uninterrupted run's trajectory (same
files, same weights and losses as the reference's checkpoint of that step); that every restart
resumes from the newest of them; and that the finished run equals the uninterrupted one exactly
(metrics.json, and every tensor of the final model.safetensors with torch.equal). The reference
keeps every checkpoint (`keep_last` only decides deletions) so each step has one to compare with.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import warnings
from collections import Counter
from functools import partial
from pathlib import Path

import fault_harness as fh
import pytest
import torch
import transformers.modeling_utils
from conftest import TINY
from safetensors import SafetensorError
from safetensors.torch import load_file

from ofa_ufo.training import Trainer
from ofa_ufo.training import checkpoint as ckpt
from ofa_ufo.training.__main__ import main
from ofa_ufo.training.config import config_from_dict

# dropout: the RNG state must come back too; classification: its evaluation is fast (no Java tokenizer)
RUN = {"model_overrides": {**TINY, "dropout": 0.1}, "tasks": {"classification": 1}, "batch_size": 2,
       "max_steps": 6, "save_every": 1, "keep_last": 2, "eval_every": 2, "eval_examples": 2,
       "demo_train_scenes": 16, "log_every": 1, "num_threads": 1}
VARIANTS = {
    "every_step": RUN,
    # the last step (5) is saved after the final evaluation, off the save_every grid
    "sparse": {**RUN, "max_steps": 5, "save_every": 2, "keep_last": 1, "eval_every": 3},
    # DataLoader workers build the batches: killed with the trainer, restarted with it
    "workers": {**RUN, "data_workers": 1},
}


# ---- 1. kills and restarts ---------------------------------------------------------------


def reference_run(fields: dict, root: Path) -> Path:
    """The uninterrupted run of `fields`, every checkpoint kept, in `root/reference`."""
    output_dir = root / "reference"
    if not (output_dir / "metrics.json").exists():
        log_dir = root / "reference_logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        argv = fh.as_argv({**fields, "keep_last": fields["max_steps"], "output_dir": str(output_dir)})
        run = fh.run_with_faults(argv, [], log_dir, after_kill=lambda: None, max_launches=1)
        assert run.kills == 0
    return output_dir


def check_checkpoints(output_dir: Path, reference: Path) -> int | None:
    """After a kill: every listed checkpoint reads in full and equals the reference's of its step.
    Returns the newest one's step (where the restart must resume), None when there is none."""
    listed = ckpt.list_checkpoints(output_dir)
    for path in listed:
        state, weights = fh.read_checkpoint(path)
        twin = ckpt.checkpoint_dir(reference) / path.name
        twin_state, twin_weights = fh.read_checkpoint(twin)
        assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in twin.iterdir()), path
        assert state["step"] == fh.step_of(path)
        assert json.loads(state["history"]) == json.loads(twin_state["history"]), path
        assert weights.keys() == twin_weights.keys(), path
        assert all(torch.equal(weights[k], twin_weights[k]) for k in weights), path
    return fh.step_of(listed[-1]) if listed else None


def steps_lost(output_dir: Path, reference: Path) -> int:
    """Reference steps whose loss is missing or different in the finished run (goal: 0)."""
    losses = json.loads((output_dir / "metrics.json").read_text())["losses"]
    wanted = json.loads((reference / "metrics.json").read_text())["losses"]
    return sum(i >= len(losses) or losses[i] != loss for i, loss in enumerate(wanted))


def check_finished(output_dir: Path, reference: Path, fields: dict) -> None:
    """The finished run equals the uninterrupted one and left no temporary files."""
    assert json.loads((output_dir / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
    final, wanted = load_file(output_dir / ckpt.WEIGHTS_FILE), load_file(reference / ckpt.WEIGHTS_FILE)
    assert final.keys() == wanted.keys()
    assert all(torch.equal(final[k], wanted[k]) for k in final)
    steps = [fh.step_of(p) for p in ckpt.list_checkpoints(reference)]
    assert [fh.step_of(p) for p in ckpt.list_checkpoints(output_dir)] == steps[-fields["keep_last"]:]
    hidden = [str(p) for p in output_dir.rglob(".*")]
    assert hidden == [], hidden


def campaign(seeds: list[int], variants: list[str], faults: list[int], root: Path) -> dict[str, int]:
    """Run seed i of variant variants[i] with faults[i] planned faults, each killed and restarted until it
    finishes; check every kill and the end. Returns the figures the summary line prints."""
    totals: Counter = Counter()
    kinds: Counter = Counter()
    for seed, variant, count in zip(seeds, variants, faults):
        fields = VARIANTS[variant]
        reference = reference_run(fields, root / variant)
        output_dir = root / f"run{seed}"
        (root / f"logs{seed}").mkdir()
        argv = fh.as_argv({**fields, "output_dir": str(output_dir)})
        plan = fh.fault_plan(seed, count)
        run = fh.run_with_faults(argv, plan, root / f"logs{seed}", partial(check_checkpoints, output_dir, reference))
        lost = steps_lost(output_dir, reference)
        check_finished(output_dir, reference, fields)
        kinds.update(launch.fault.split(":")[0] for launch in run.launches if launch.killed)
        totals.update(runs=1, faults=run.kills, resumes=run.resumes, launches=len(run.launches),
                      recomputed=run.steps_recomputed(fields["max_steps"]), steps_lost=lost,
                      examples_lost=lost * fields["batch_size"], runs_with_a_fault=run.kills > 0)
    print(f"\nfault injection: {totals['runs']} runs, {totals['faults']} faults injected "
          f"({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}), {totals['launches']} launches, "
          f"{totals['resumes']} resumed, {totals['recomputed']} steps recomputed, {totals['steps_lost']} steps "
          f"and {totals['examples_lost']} examples lost")
    return dict(totals, kinds=len(kinds))


def test_kills_resume_to_the_uninterrupted_run(tmp_path):
    """3 runs of 3 faults: together they plan every kind (each named point and a random delay; a delay
    longer than the launch it was meant for injects nothing)."""
    figures = campaign([0, 1, 2], ["every_step"] * 3, [3, 3, 3], tmp_path)
    assert figures["runs_with_a_fault"] == 3  # each run's first fault is a named point a fresh run reaches
    assert figures["faults"] >= 4 and figures["resumes"] >= 3
    assert figures["steps_lost"] == 0


@pytest.mark.slow
def test_fault_campaign_20_seeded_runs(tmp_path):
    """20 runs, 3 or 4 faults each, over the three variants (every step saved, sparse saves, data workers)."""
    seeds = list(range(20))
    variants = [sorted(VARIANTS)[seed % len(VARIANTS)] for seed in seeds]
    figures = campaign(seeds, variants, [3 + seed % 2 for seed in seeds], tmp_path)
    assert figures["faults"] >= 20 and figures["kinds"] == len(fh.KINDS)
    assert figures["steps_lost"] == 0


def test_replacing_a_checkpoint_killed_between_its_renames_puts_the_old_one_back(tmp_path):
    """A checkpoint rewritten at the same step (a run resumed from an older directory) is moved aside
    before its replacement lands; killed in between, the next resume puts it back."""
    final = tmp_path / "checkpoints" / "step-0000003"
    final.parent.mkdir()
    ckpt.write_atomically(final, lambda tmp: (tmp / "weights.bin").write_bytes(b"old"))
    died = fh.in_child(fh.replace_checkpoint_file, (str(final), b"new"), "write.swapping:1")
    assert died == -signal.SIGKILL
    assert not final.exists() and ckpt.list_checkpoints(tmp_path) == []
    ckpt.remove_leftovers(final.parent)  # what a resume ("auto") and the next save do first
    assert (final / "weights.bin").read_bytes() == b"old"  # put back whole
    assert sorted(p.name for p in final.parent.iterdir()) == ["step-0000003"]


def test_fault_points_are_inert_without_the_variable(monkeypatch):
    monkeypatch.delenv(ckpt.FAULT_ENV, raising=False)
    for name in ckpt.FAULT_POINTS:
        ckpt.fault_point(name)  # still alive
    assert fh.in_child(fh.reach_fault_point, ("checkpoint.pruning", 2), "checkpoint.pruning:3") == 0
    assert fh.in_child(fh.reach_fault_point, ("checkpoint.pruning", 3), "checkpoint.pruning:3") == -signal.SIGKILL


# ---- in-process runs for the disk and corruption tests -----------------------------------

SMALL = {"model_overrides": {**TINY}, "tasks": {"classification": 1}, "batch_size": 2, "max_steps": 3,
         "save_every": 1, "keep_last": 2, "eval_examples": 0, "demo_train_scenes": 16, "log_every": 1,
         "num_threads": 1}


def small_config(output_dir: Path, **fields):
    return config_from_dict({**SMALL, "output_dir": str(output_dir), **fields}, "test")


def fit(config, resume="never"):
    threads = torch.get_num_threads()
    try:
        return Trainer(config, resume=resume).fit()
    finally:
        torch.set_num_threads(threads)


def saved_losses(output_dir: Path) -> list[float]:
    return json.loads((output_dir / "metrics.json").read_text())["losses"]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """An uninterrupted 3-step run, a checkpoint every step (the last two kept)."""
    output_dir = tmp_path_factory.mktemp("small")
    fit(small_config(output_dir))
    return output_dir


# ---- 2. disk full ------------------------------------------------------------------------


def fail_like_a_full_disk(write, error):
    """`write(path, ...)`'s stand-in: the 2nd checkpoint's call writes half a file, then raises `error(path)`
    (what the disk does when it fills); every other call writes for real."""
    calls = []

    def fake(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) != 2:
            return write(obj, path, *args, **kwargs)
        Path(path).write_bytes(b"\0" * 1000)
        raise error(str(path))

    return fake, calls


def safetensors_disk_full(path: str) -> Exception:
    """What safetensors' Rust writer raises for ENOSPC (no errno, no file name)."""
    return SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                           'left on device" })')


def os_disk_full(path: str) -> Exception:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


@pytest.mark.parametrize("target", ["weights", "trainer_state"])
def test_disk_full_during_a_checkpoint_write(small_run, tmp_path, monkeypatch, capsys, target):
    output_dir = tmp_path / "run"
    config = small_config(output_dir)
    if target == "weights":
        fake, calls = fail_like_a_full_disk(transformers.modeling_utils.safe_save_file, safetensors_disk_full)
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fake)
    else:
        fake, calls = fail_like_a_full_disk(torch.save, os_disk_full)
        monkeypatch.setattr(torch, "save", fake)
    before: dict[str, bytes] = {}
    real_save_checkpoint = ckpt.save_checkpoint

    def remember_checkpoints(*args, **kwargs):
        before.update(snapshot(ckpt.checkpoint_dir(output_dir)) if ckpt.checkpoint_dir(output_dir).is_dir() else {})
        return real_save_checkpoint(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", remember_checkpoints)
    threads = torch.get_num_threads()
    try:
        assert main(fh.as_argv({**SMALL, "output_dir": str(output_dir)})) == 1
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    failed = Path(calls[1])  # a file inside the temporary directory of step 2
    step2 = ckpt.checkpoint_dir(output_dir) / "step-0000002"
    expected = (f"error: disk full (no space left on device) while writing "
                f"{failed if target == 'trainer_state' else failed.parent} for {step2}")
    assert expected in err, err
    assert "Traceback" not in err
    assert failed.parent.name.startswith(".step-0000002.tmp-")
    # the temporary files are gone and step 1 is byte for byte what it was before the failed write
    assert sorted(p.name for p in ckpt.checkpoint_dir(output_dir).iterdir()) == ["step-0000001"]
    assert snapshot(ckpt.checkpoint_dir(output_dir)) == before and before
    monkeypatch.undo()  # space freed: the run resumes from step 1 and ends where the uninterrupted one did
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean resume skips nothing
        fit(config, resume="auto")
    assert saved_losses(output_dir) == saved_losses(small_run)


# ---- 3. corrupt checkpoints --------------------------------------------------------------


def truncate(file: Path) -> None:
    with open(file, "r+b") as handle:
        handle.truncate(file.stat().st_size // 2)


CORRUPTIONS = {
    "truncated weights": (ckpt.WEIGHTS_FILE, truncate),
    "missing weights": (ckpt.WEIGHTS_FILE, Path.unlink),
    "garbage trainer state": (ckpt.STATE_FILE, lambda f: f.write_bytes(os.urandom(4096))),
    "missing trainer state": (ckpt.STATE_FILE, Path.unlink),
    "truncated config": ("config.json", truncate),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(small_run, tmp_path, corruption):
    output_dir = tmp_path / "run"
    shutil.copytree(small_run, output_dir)
    name, corrupt = CORRUPTIONS[corruption]
    newest, previous = ckpt.checkpoint_dir(output_dir) / "step-0000003", ckpt.checkpoint_dir(output_dir) / "step-0000002"
    corrupt(newest / name)
    # the warning names the checkpoint and the bad file (a missing config.json: the directory)
    bad = re.escape(str(newest / name))
    with pytest.warns(UserWarning, match=rf"skipping checkpoint {re.escape(str(newest))}: .*{bad}"):
        trainer = Trainer(small_config(output_dir), resume="auto")
    assert (trainer.resume_from, trainer.step) == (previous, 2)
    threads = torch.get_num_threads()
    try:
        trainer.fit()  # retrains step 3 and writes a good step-0000003 over the bad one
    finally:
        torch.set_num_threads(threads)
    assert saved_losses(output_dir) == saved_losses(small_run)
    fh.read_checkpoint(newest)
    assert sorted(p.name for p in ckpt.checkpoint_dir(output_dir).iterdir()) == [previous.name, newest.name]
    assert not list(output_dir.rglob(".*"))


def test_no_usable_checkpoint_is_a_clear_error(small_run, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(small_run, output_dir)
    newest, previous = ckpt.list_checkpoints(output_dir)[-1], ckpt.list_checkpoints(output_dir)[-2]
    truncate(newest / ckpt.WEIGHTS_FILE)
    (previous / ckpt.STATE_FILE).write_bytes(b"not a pickle")
    message = (rf"no usable checkpoint in {re.escape(str(ckpt.checkpoint_dir(output_dir)))}: cannot read "
               rf"{re.escape(str(newest / ckpt.WEIGHTS_FILE))}: .*; cannot read {re.escape(str(previous / ckpt.STATE_FILE))}"
               r": .*Start over with --resume never")
    with pytest.warns(UserWarning, match="skipping checkpoint"), pytest.raises(ckpt.CheckpointError, match=message):
        Trainer(small_config(output_dir), resume="auto")
    # a directory named explicitly is used as is: no fallback, the bad file named
    with pytest.raises(ckpt.CorruptCheckpointError, match=rf"cannot read {re.escape(str(newest / ckpt.WEIGHTS_FILE))}"):
        Trainer(small_config(output_dir), resume=str(newest))


def test_resume_puts_back_a_checkpoint_whose_replacement_never_landed(small_run, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(small_run, output_dir)
    root = ckpt.checkpoint_dir(output_dir)
    (root / "step-0000003").rename(root / ".step-0000003.old-4242")  # as write.swapping leaves it
    (root / ".step-0000004.tmp-4242").mkdir()  # an unfinished write: never resumed from, removed
    trainer = Trainer(small_config(output_dir), resume="auto")
    assert (trainer.resume_from, trainer.step) == (root / "step-0000003", 3)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000002", "step-0000003"]


def test_resume_with_data_workers_and_dropout_is_exact(tmp_path):
    """Starting the DataLoader again at the resumed step must not draw from the global RNG (which
    drives dropout): the campaign's data-worker runs diverged at the first step after a resume."""
    fields = {"model_overrides": {**TINY, "dropout": 0.1}, "data_workers": 1, "max_steps": 2}
    reference = fit(small_config(tmp_path / "reference", **fields))
    output_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "reference", output_dir)
    shutil.rmtree(ckpt.checkpoint_dir(output_dir) / "step-0000002")
    (output_dir / "metrics.json").unlink()
    resumed = fit(small_config(output_dir, **fields), resume="auto")
    assert resumed.losses == reference.losses
    assert abs(reference.losses[1] - reference.losses[0]) > 1e-3  # the comparison has something to see
