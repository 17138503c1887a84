"""Resumable checkpoints: written whole or not at all, the newest `keep_last` kept.

A checkpoint is a directory `checkpoints/step-0000120/` holding a `save_pretrained` model and
processor (safetensors), `trainer_state.pt` (optimizer, scheduler, RNG states, step and
history; read back with `torch.load(weights_only=True)`), the EMA weights when enabled and
the run's `train_config.yaml`. It is written under a temporary name and renamed into place,
so a killed run leaves either the previous checkpoints or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from ofa_ufo.hf.configuration import OFAUFOConfig

PREFIX = "step-"
STATE_FILE = "trainer_state.pt"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "train_config.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (missing, unreadable or of another architecture)."""


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resume_path(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint a run resumes from: `resume` "auto" (the newest in `output_dir`, if any), "never"
    or None (none), or a checkpoint directory, which must exist."""
    if resume in (None, "never"):
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume checkpoint {path} does not exist")
    return path


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


def write_atomically(final: Path, write: Any) -> None:
    """Call `write(tmp_dir)`, then rename the finished directory to `final` (replacing it)."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_directory(final.parent)  # the rename itself survives a power cut only once its directory is synced


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
    staging.rmdir()
    fsync_directory(output_dir)


def save_checkpoint(output_dir: str | Path, step: int, model, processor, state: dict[str, Any], config_yaml: str,
                    ema=None, keep_last: int = 2, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep_last`; `weights`
    is the full state dict when the model is sharded (FSDP), else the model's own is used."""
    final = checkpoint_dir(output_dir) / f"{PREFIX}{step:07d}"
    for stale in checkpoint_dir(output_dir).glob(f".{PREFIX}*.tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=weights)
        processor.save_pretrained(tmp)
        torch.save(state, tmp / STATE_FILE)
        if ema is not None:
            save_model(ema, str(tmp / EMA_FILE))
        (tmp / CONFIG_FILE).write_text(config_yaml)

    write_atomically(final, write)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old)
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
        raise CheckpointError(f"{path} is not a checkpoint directory (no config.json)")
    saved = architecture(OFAUFOConfig.from_dict(json.loads(saved_file.read_text())))
    wanted = architecture(model_config)
    differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differ:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {wanted.get(k)!r}" for k in differ[:6])
        raise CheckpointError(f"cannot resume from {path}: another architecture ({details}); nothing was written")


def load_weights(module: torch.nn.Module, file: Path) -> None:
    """Load safetensors weights into `module`; tied weights may be absent, anything else must match."""
    try:
        weights = load_file(str(file))
    except (SafetensorError, OSError) as error:  # truncated or missing: name the file
        raise CheckpointError(f"cannot read {file}: {error}") from None
    missing, unexpected = module.load_state_dict(weights, strict=False)
    state = module.state_dict()
    loaded = {state[k].data_ptr() for k in weights if k in state}
    untied = [k for k in missing if state[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise CheckpointError(f"{file}: missing keys {untied[:5]}, unexpected keys {unexpected[:5]}")


def load_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint `path`, read with the restricted unpickler."""
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {STATE_FILE}: not a resumable checkpoint") from None
    except Exception as error:  # a truncated or foreign file: name it instead of a pickle traceback
        raise CheckpointError(f"cannot read {path / STATE_FILE}: {error}") from None
