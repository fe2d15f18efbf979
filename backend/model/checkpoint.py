"""Checkpoint directories: `model.safetensors` + `config.json` + `tokenizer.json`.

Self-contained (nothing is downloaded). Saving never mixes two checkpoints: everything is written
into a temporary sibling directory, the old one is renamed aside and the new one into place. A
crash between those two renames leaves the old one as `.NAME.old-PID` and no NAME; loading NAME
then says so and where it is. Loading checks every file and says what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..files import current_umask, file_in_the_way
from .config import PRESETS, ConfigError, MaMMUTConfig
from .mammut import MaMMUT
from .tokenizer import Tokenizer, TokenizerError

FORMAT = "skyprompt-mammut"
FORMAT_VERSION = 1
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


# The optimizer state and step a training checkpoint holds beside its weights (training.train).
TRAINING_STATE = "train_state.pt"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded or written; the message says why and what to do."""


def save_checkpoint(model: MaMMUT, tokenizer: Tokenizer, directory: str | os.PathLike,
                    dtype: torch.dtype | None = None, extra: dict | None = None,
                    write_extra: Callable[[Path], None] | None = None, training_state: bool = False) -> Path:
    """Write model + config + tokenizer to `directory` atomically.

    `dtype` (e.g. torch.float16) casts floating-point weights for a smaller file; `extra` (training
    metadata) goes into config.json; `write_extra(tmp_dir)` may add files (e.g. optimizer state)
    that must appear together with the weights or not at all; `training_state` says that they include
    the optimizer state (a training checkpoint may then replace an earlier one).
    """
    # a link to a checkpoint replaces the checkpoint it leads to, not itself; "." names its folder
    directory = Path(os.path.realpath(directory))
    # first: a checkpoint a killed save set aside is put back, and then judged as the target it is
    _remove_stale_saves(directory)
    check_checkpoint_target(directory, training_state=training_state)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the folder {directory.parent} for the checkpoint: "
                              f"{e.strerror or e}; pick a writable output path") from None
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}")
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        state[k] = v.contiguous()
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(directory)}{_this_process()}-", dir=directory.parent))
    try:
        try:
            save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        except SafetensorError as e:    # its I/O errors (a full disk) as what they are, for every caller
            raise OSError(f"cannot write {WEIGHTS}: {e}") from None
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict()}
        if extra:
            meta["training"] = extra
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        tokenizer.save(tmp / TOKENIZER)
        if write_extra is not None:
            write_extra(tmp)
        # mkdtemp makes a private (0700) folder and some writers private files: give the checkpoint
        # the permissions any new file would get, so a server running as another user can read it
        umask = current_umask()
        tmp.chmod(0o777 & ~umask)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def check_checkpoint_target(target: Path, training_state: bool = False) -> None:
    """Refuse to overwrite anything but an empty folder or an earlier checkpoint.

    Saving replaces the whole target folder, so a mistyped output path (a data folder, a run
    folder, a file) would otherwise be deleted without a word. Nor may a plain save (an export)
    replace a training checkpoint: its optimizer state, which `--resume` needs, would go with it;
    only a training save (`training_state`, which writes that state again) may.
    """
    blocking = file_in_the_way(target.parent)
    if blocking is not None:
        raise CheckpointError(f"{target}: {blocking} is a file, not a folder; pick a new output path")
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a folder; a checkpoint is a folder: "
                              "pick a new output path")
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return
    try:
        meta = json.loads((target / CONFIG).read_text())
        is_checkpoint = isinstance(meta, dict) and meta.get("format") == FORMAT
    except (OSError, ValueError):
        is_checkpoint = False
    if not is_checkpoint:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise CheckpointError(f"{target} already holds files that are not a SkyPrompt checkpoint ({shown}); "
                              "saving would replace the whole folder: pick a new output path or remove it first")
    if TRAINING_STATE in entries and not training_state:
        raise CheckpointError(f"{target} is a training checkpoint (its {TRAINING_STATE} is what --resume continues "
                              "from); saving here would drop it: pick a new output path")


def _aside_prefix(target: Path) -> str:
    """The name a checkpoint being replaced takes while the new one is renamed in, less the pid."""
    return f".{target.name}.old-"


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _this_process() -> str:
    """"PID@HOST": whose save a temporary folder is. The host, because a folder on shared storage may
    be another machine's, whose process numbers say nothing here."""
    return f"{os.getpid()}@{socket.gethostname().replace('-', '_').replace('/', '_')}"


def _ended_here(owner: str) -> bool:
    """Whether "PID@HOST" names a process of this machine that has ended (POSIX only: on Windows
    os.kill(pid, 0) would end the process instead of probing it)."""
    pid, _, host = owner.partition("@")
    me = _this_process()
    if os.name != "posix" or not pid.isdigit() or owner == me or host != me.partition("@")[2]:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, OSError):
        pass    # alive (another user's), or no number a process has
    return False


def _remove_stale_saves(target: Path) -> None:
    """Remove the temporary folders that saves of `target` killed before their end left beside it (a
    whole copy of the weights each), known by the process and machine in their names: never another
    live save's, nor another machine's. A checkpoint one such save set aside, killed between its two
    renames, is put back when it is the only one there is. Folders without an owner (earlier
    versions') are left alone."""
    prefix, aside = _tmp_prefix(target), _aside_prefix(target)
    try:
        leftovers = [p for p in target.parent.iterdir() if p.name.startswith((prefix, aside)) and p.is_dir()]
    except OSError:
        return
    for folder in leftovers:
        is_aside = folder.name.startswith(aside)
        rest = folder.name[len(aside if is_aside else prefix):]
        owner = rest if is_aside else rest.rpartition("-")[0]     # mkdtemp's own letters follow the last "-"
        if not _ended_here(owner):
            continue
        if is_aside and not target.exists():
            os.replace(folder, target)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def _replace_dir(new: Path, target: Path) -> None:
    """Swap `new` into place of `target` with renames (the old one is removed only afterwards)."""
    if target.exists():
        old = target.with_name(f"{_aside_prefix(target)}{_this_process()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def step_dirs(folder: Path) -> list[Path]:
    """The checkpoints training saved in `folder` (a run's OUT/checkpoints): its `step_NNNNNNN`
    folders, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_"))


# what training writes in its run folder (--out) beside checkpoints/: the run's settings
RUN_CONFIG = "train_config.json"


def run_folder_hint(path: str | os.PathLike) -> str:
    """For a checkpoint path that is a training run's --out (or its checkpoints folder): which
    checkpoint to give instead, as the end of a message; "" otherwise. The run folder is the path a
    user has at hand. The run's fp16 export, where it wrote one, is the one to serve; its newest
    checkpoint is the one to fine-tune or evaluate otherwise."""
    path = Path(path)
    if (path / CONFIG).is_file():
        return ""
    steps = step_dirs(path / "checkpoints") or step_dirs(path)
    if not steps:
        return ""
    newest = f"one of its checkpoints, e.g. {steps[-1]}"
    export = _run_export(steps[-1].parent.parent)
    if export is None:
        return f"; {path} is a training run's folder: give {newest}"
    return f"; {path} is a training run's folder: give its fp16 export {export} (the one to serve), or {newest}"


def _run_export(run: Path) -> Path | None:
    """The fp16 checkpoint a training run exported (its --export-fp16, as its settings record it, or
    RUN/fp16, where the README's examples put it), when it is there."""
    try:
        settings = json.loads((run / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        settings = None
    if not isinstance(settings, dict):
        settings = {}
    candidates = _recorded_export(settings.get("export_fp16"), settings.get("out"), run) + [run / "fp16"]
    return next((c for c in candidates if (c / CONFIG).is_file()), None)


def _recorded_export(export, out, run: Path) -> list[Path]:
    """Where a run's recorded --export-fp16 may be. Training records it absolute; an older run recorded
    it as typed, relative to the directory training ran in, as its --out (`out`) was: its place relative
    to the run folder holds from wherever one looks (and when the two were moved together), else it
    is taken from the current directory."""
    if not isinstance(export, str) or not export:
        return []
    if os.path.isabs(export):
        return [Path(export)]
    from_run = []
    if isinstance(out, str) and out and not os.path.isabs(out):
        # both relative to one directory: the path from the run folder to the export leaves it out
        from_run = [Path(os.path.normpath(run / os.path.relpath(export, out)))]
    return from_run + [Path(export)]


def _check_is_a_folder(directory: Path) -> None:
    """CheckpointError for a checkpoint path that is no folder: missing (or set aside by a save that was
    interrupted), or one of a checkpoint's files."""
    if directory.is_dir():
        return
    aside = list(directory.parent.glob(f"{_aside_prefix(directory)}*")) if directory.name else []
    if aside and not directory.exists():
        newest = max(aside, key=lambda p: p.stat().st_mtime)
        raise CheckpointError(f"checkpoint directory {directory} does not exist: a save into it was interrupted, "
                              f"and the checkpoint before it is {newest}; rename that back to use it")
    if directory.is_file():
        folder = f"its folder, {directory.parent}" if directory.name in (WEIGHTS, CONFIG, TOKENIZER) else "that folder"
        raise CheckpointError(f"checkpoint {directory} is a file; a checkpoint is the folder that holds {WEIGHTS}, "
                              f"{CONFIG} and {TOKENIZER}: give {folder}")
    raise CheckpointError(f"checkpoint directory {directory} does not exist (or is not a directory)")


def read_config(directory: str | os.PathLike) -> MaMMUTConfig:
    """The model config of the checkpoint in `directory`, a quick check that it is one; CheckpointError
    saying what is wrong and what to give instead (a file, a run's folder)."""
    directory = Path(directory)
    _check_is_a_folder(directory)
    path = directory / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a checkpoint directory needs {WEIGHTS}, {CONFIG} and {TOKENIZER}"
                              f"{run_folder_hint(directory)}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged, copy it again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{path} is not a SkyPrompt model config (expected \"format\": \"{FORMAT}\")")
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{path}: format_version must be a whole number, got {version!r}; the checkpoint is "
                              "damaged, copy it again")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {meta['format_version']}; this SkyPrompt reads up to "
                              f"{FORMAT_VERSION}: upgrade SkyPrompt")
    preset = meta["model"].get("preset", "custom")
    if preset != "custom" and preset not in PRESETS:
        raise CheckpointError(f"{path} names unknown model preset {preset!r}; known presets: {', '.join(PRESETS)}")
    try:
        return MaMMUTConfig.from_dict(meta["model"])
    except (ConfigError, TypeError, ValueError) as e:     # ValueError: e.g. an image_mean of words
        raise CheckpointError(f"{path}: {e}; the checkpoint is damaged, copy it again") from None


def load_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[MaMMUT, Tokenizer]:
    """Load (model in eval mode, tokenizer) from a checkpoint directory, checking everything."""
    directory = Path(directory)
    cfg = read_config(directory)
    tok_path = directory / TOKENIZER
    if not tok_path.is_file():
        raise CheckpointError(f"{tok_path} is missing: a checkpoint directory needs {WEIGHTS}, {CONFIG} and {TOKENIZER}")
    try:
        # a checkpoint's tokenizer was trained with its weights: a new one would not match them
        tokenizer = Tokenizer.load(tok_path, hint="it belongs to these weights: copy the checkpoint folder "
                                                  "again from where it came")
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{tok_path} has {tokenizer.vocab_size} tokens but {CONFIG} says vocab_size "
                              f"{cfg.vocab_size}: the tokenizer does not belong to these weights")
    ours = (cfg.pad_id, cfg.bos_id, cfg.eos_id)
    theirs = (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
    if ours != theirs:
        raise CheckpointError(f"{CONFIG} gives <pad>, <bos>, <eos> the ids {ours} but {tok_path} has {theirs}: the "
                              "tokenizer does not belong to these weights")
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing: a checkpoint directory needs {WEIGHTS}, {CONFIG} and {TOKENIZER}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights} is truncated or corrupt ({e}); copy or re-download the checkpoint") from None
    try:
        model = MaMMUT(cfg)
    except (ConfigError, TypeError, ValueError, RuntimeError) as e:   # values read_config's checks let by, e.g. a negative mlp_ratio
        raise CheckpointError(f"{directory / CONFIG}: its model settings cannot make a model ({e}); the "
                              "checkpoint is damaged, copy it again") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {'; '.join(wrong[:3])})")
        raise CheckpointError(f"{weights} does not match {CONFIG}: " + ", ".join(parts))
    # the file format checks the header and sizes, not the numbers: damaged data shows up as NaN or inf
    damaged = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if damaged:
        raise CheckpointError(f"{weights} holds non-finite values in {len(damaged)} tensor(s) (e.g. "
                              f"{', '.join(damaged[:3])}): the file is damaged, copy it again")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def checkpoint_hash(directory: str | os.PathLike) -> str:
    """sha256 over weights, config and tokenizer: identifies the model that made an embedding."""
    h = hashlib.sha256()
    for name in (WEIGHTS, CONFIG, TOKENIZER):
        with open(Path(directory) / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
