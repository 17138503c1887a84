"""Resumable checkpoints: written whole or not at all, the newest `keep_last` kept.

A checkpoint is a directory `checkpoints/step-0000120/` holding a `save_pretrained` model and
processor (safetensors), `trainer_state.pt` (optimizer, scheduler, RNG states, step and
history; read back with `torch.load(weights_only=True)`), the EMA weights when enabled and
the run's `train_config.yaml`. It is written under a temporary name and renamed into place,
and an old one is renamed aside before it is deleted, so a killed run leaves either the
previous checkpoints or the new one, never half of one. A full disk ends the write with a
`DiskFullError` (temporary files removed); on resume a checkpoint with a missing or unreadable
file is skipped, with a warning, for the one before it (`load_resumable`).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_model

from ofa_ufo.hf.configuration import OFAUFOConfig

PREFIX = "step-"
STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "train_config.yaml"
# hidden siblings a killed write or deletion leaves: `.step-0000004.tmp-PID` (being written),
# `.step-0000004.old-PID` (a checkpoint moved aside to be replaced), `.step-0000004.deleting-PID`
LEFTOVER_KINDS = ("tmp", "old", "deleting")
FAULT_ENV = "OFA_UFO_FAULT_POINT"
# where `fault_point` can kill a run (tests/test_fault_injection.py); write.* fire for every atomic write
FAULT_POINTS = ("checkpoint.weights_written", "write.files_written", "write.before_rename", "write.swapping",
                "write.renamed", "checkpoint.pruning", "export.moving")
_fault_hits: dict[str, int] = {}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (missing, unreadable or of another architecture)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that is missing, truncated or unreadable: "auto" resume skips to the one before."""


class DiskFullError(CheckpointError):
    """No space left while writing a checkpoint or the final model; the partial files are removed."""


def fault_point(name: str) -> None:
    """Fault-injection hook, inert unless `OFA_UFO_FAULT_POINT` is set: "NAME:N" SIGKILLs this process
    the N-th time it reaches point NAME (one of `FAULT_POINTS`; N defaults to 1), so tests can kill a
    run at an exact place inside a checkpoint write."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def _leftover(path: Path) -> tuple[str, str] | None:
    """(final name, kind) of a hidden `.NAME.KIND-PID` directory a killed write left, else None."""
    name, dot, suffix = path.name.rpartition(".")
    kind = suffix.split("-", 1)[0]
    if not (name.startswith(".") and dot and kind in LEFTOVER_KINDS and suffix[len(kind):len(kind) + 1] == "-"):
        return None
    return name[1:], kind


def remove_leftovers(parent: Path, name: str | None = None) -> None:
    """Clean up after writes killed midway in `parent` (of `name` only, when given): a checkpoint moved
    aside to be replaced whose replacement never landed is put back (it is complete); unfinished
    writes and deletions are removed. Renames tolerate another process doing the same."""
    if not parent.is_dir():
        return
    for path in sorted(parent.iterdir()):
        found = _leftover(path)
        if found is None or (name is not None and found[0] != name):
            continue
        final = parent / found[0]
        if found[1] == "old" and not final.exists():
            try:
                path.rename(final)
            except OSError:  # another process put it back first
                pass
        else:
            shutil.rmtree(path, ignore_errors=True)


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def is_disk_full(error: BaseException) -> bool:
    """Whether a write failed for lack of space: an OSError with ENOSPC/EDQUOT, or the same error as
    safetensors (Rust `StorageFull`) and torch.save word it."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return any(sign in text for sign in ("No space left on device", "StorageFull", "Disk quota exceeded"))


def write_atomically(final: Path, write: Any) -> None:
    """Call `write(tmp_dir)`, then rename the finished directory to `final` (replacing it). A failed
    write removes the temporary directory; a full disk raises `DiskFullError` naming the file."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    remove_leftovers(final.parent, final.name)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        fault_point("write.files_written")
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(error):
            where = getattr(error, "filename", None) or tmp
            raise DiskFullError(f"disk full (no space left on device) while writing {where} for {final}: the "
                                f"partial files were removed and {final.parent} holds what it held before; free "
                                "space and run again (a run resumes from its newest complete checkpoint)") from error
        raise
    fault_point("write.before_rename")
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        fault_point("write.swapping")  # `final` is missing here: remove_leftovers puts `old` back
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_directory(final.parent)  # the rename itself survives a power cut only once its directory is synced
    fault_point("write.renamed")


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries (renames, new files) to disk (POSIX; a no-op where directories cannot be opened)."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def export_into(output_dir: str | Path, write: Any) -> None:
    """Call `write(tmp_dir)` in a staging directory written atomically, then move each of its entries
    into `output_dir` (replacing files and folders of the same name): a servable final model, never
    half of one."""
    output_dir = Path(output_dir)
    staging = output_dir / ".final"
    write_atomically(staging, write)
    for path in staging.iterdir():
        target = output_dir / path.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(path, target)
        fault_point("export.moving")
    staging.rmdir()
    fsync_directory(output_dir)


def save_checkpoint(output_dir: str | Path, step: int, model, processor, state: dict[str, Any], config_yaml: str,
                    ema=None, keep_last: int = 2, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep_last`; `weights`
    is the full state dict when the model is sharded (FSDP), else the model's own is used."""
    final = checkpoint_dir(output_dir) / f"{PREFIX}{step:07d}"
    remove_leftovers(final.parent)  # left by a run killed mid-write

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=weights)
        fault_point("checkpoint.weights_written")
        processor.save_pretrained(tmp)
        torch.save(state, tmp / STATE_FILE)
        if ema is not None:
            save_model(ema, str(tmp / EMA_FILE))
        (tmp / CONFIG_FILE).write_text(config_yaml)

    write_atomically(final, write)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        doomed = old.with_name(f".{old.name}.deleting-{os.getpid()}")
        old.rename(doomed)  # hidden first: a deletion killed midway never leaves a listed half checkpoint
        fault_point("checkpoint.pruning")
        shutil.rmtree(doomed)
    return final


def architecture(config) -> dict[str, Any]:
    """The config fields that define the parameter shapes (training-only settings excluded)."""
    ignored = {"dropout", "attention_dropout", "activation_dropout", "encoder_drop_path_rate",
               "decoder_drop_path_rate", "label_smoothing", "transformers_version", "torch_dtype", "dtype",
               "architectures", "_name_or_path"}  # metadata save_pretrained/from_pretrained fill in
    fields = config.to_dict()
    # the task vocabulary decides parameter rows and routes only in a routed supernet: elsewhere a task
    # registered since the run started must not block its resume
    vision_ignored = {"supernet_sample_arch", "supernet_sandwich", "drop_path_rate"}
    if not config.vision_config.routes_tasks:
        vision_ignored.add("task_names")
    vision = {k: v for k, v in fields.pop("vision_config", {}).items() if k not in vision_ignored}
    return {**{k: v for k, v in fields.items() if k not in ignored}, "vision_config": vision}


def check_compatible(path: Path, model_config) -> None:
    """Refuse to resume from a checkpoint whose architecture differs from the configured model."""
    saved_file = path / "config.json"
    if not saved_file.is_file():
        raise CorruptCheckpointError(f"{path} is not a checkpoint directory (no config.json)")
    try:
        saved = architecture(OFAUFOConfig.from_dict(json.loads(saved_file.read_text())))
    except (ValueError, TypeError, KeyError) as error:  # truncated or garbage JSON
        raise CorruptCheckpointError(f"cannot read {saved_file}: {error}") from None
    wanted = architecture(model_config)
    differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differ:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {wanted.get(k)!r}" for k in differ[:6])
        raise CheckpointError(f"cannot resume from {path}: another architecture ({details}); nothing was written")


def check_weights_file(file: Path) -> None:
    """Raise `CorruptCheckpointError` naming `file` when it is missing or its safetensors header does not
    cover the file (truncated); reads only the header."""
    try:
        with safe_open(str(file), "pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise CorruptCheckpointError(f"cannot read {file}: {error}") from None


def load_weights(module: torch.nn.Module, file: Path) -> None:
    """Load safetensors weights into `module`; tied weights may be absent, anything else must match."""
    try:
        weights = load_file(str(file))
    except (SafetensorError, OSError) as error:  # truncated or missing: name the file
        raise CorruptCheckpointError(f"cannot read {file}: {error}") from None
    missing, unexpected = module.load_state_dict(weights, strict=False)
    state = module.state_dict()
    loaded = {state[k].data_ptr() for k in weights if k in state}
    untied = [k for k in missing if state[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise CheckpointError(f"{file}: missing keys {untied[:5]}, unexpected keys {unexpected[:5]}")


def load_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint `path`, read with the restricted unpickler."""
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path / STATE_FILE} is missing: not a resumable checkpoint") from None
    except Exception as error:  # noqa: BLE001 (a truncated or foreign file: name it, not a pickle traceback)
        reason = str(error).split(". ")[0].strip()[:200]  # torch's advice to retry unrestricted is left out
        raise CorruptCheckpointError(f"cannot read {path / STATE_FILE}: truncated, garbage or not a trainer state "
                                     f"({type(error).__name__}{': ' + reason if reason else ''})") from None
    if not isinstance(state, dict) or not {"step", "optimizer", "scheduler", "rng", "history"} <= state.keys():
        raise CorruptCheckpointError(f"{path / STATE_FILE} is not a trainer state (no step, optimizer, scheduler, "
                                     "rng and history)")
    return state


def usable_checkpoint(path: Path, model_config, ema: bool) -> dict[str, Any]:
    """Check that checkpoint `path` can be resumed into a model of `model_config` and return its trainer
    state: the architecture matches and every file is present and readable (weights by their headers)."""
    check_compatible(path, model_config)
    check_weights_file(path / WEIGHTS_FILE)
    if ema:
        check_weights_file(path / EMA_FILE)
    return load_state(path)


def load_resumable(output_dir: str | Path, resume: str | None, model_config,
                   ema: bool = False) -> tuple[Path | None, dict[str, Any] | None]:
    """(checkpoint, trainer state) a run resumes from, or (None, None). `resume`: "never"/None (start
    over), a checkpoint directory (used as is), or "auto": the newest usable checkpoint in `output_dir`,
    a newer one with a missing or unreadable file skipped with a warning naming it. A checkpoint of
    another architecture is refused, never skipped; so is a run whose checkpoints are all unreadable."""
    if resume in (None, "never"):
        return None, None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"resume checkpoint {path} does not exist")
        return path, usable_checkpoint(path, model_config, ema)
    remove_leftovers(checkpoint_dir(output_dir))  # puts back a checkpoint a killed replacement moved aside
    problems = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            return path, usable_checkpoint(path, model_config, ema)
        except CorruptCheckpointError as error:
            warnings.warn(f"skipping checkpoint {path}: {error}; trying the one before it", stacklevel=2)
            problems.append(str(error))
    if problems:
        raise CheckpointError(f"no usable checkpoint in {checkpoint_dir(output_dir)}: {'; '.join(problems)}. Start "
                              "over with --resume never (resume='never') or move the broken checkpoints away")
    return None, None
