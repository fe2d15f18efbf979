"""Pre-train or fine-tune MaMMUT on image-caption pairs (contrastive + captioning losses).

One process:   python -m training.train --folder ../shared/data/rsscn7 --classnames rsscn7 --out runs/rsscn7
Several:       torchrun --nproc_per_node=2 -m training.train ...        (DDP: gloo on CPU, NCCL on GPU)
Several nodes: torchrun --nnodes=2 --node_rank=R --master_addr=HOST --master_port=29500 \\
                   --nproc_per_node=8 -m training.train ...

`--batch-size` is the GLOBAL batch of one optimizer step; each rank takes its slice of the same
global batch, so a 2-process run follows the same loss curve as a 1-process run with the same seed
(without --grad-accum: with it, each process cuts its own slice into micro-batches, so the contrastive
loss of a micro-batch sees other rows than one process's would, and the curves differ a little).
Checkpoints are atomic directories `OUT/checkpoints/step_NNNNNNN` (the last K kept); `--resume`
continues from the newest readable one exactly where it stopped (unreadable newer ones are set aside).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import pickle
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from backend.engine import EngineError, resolve_device
from backend.files import file_in_the_way, write_text_atomically
from backend.model import MaMMUT, MaMMUTLoss, get_preset
from backend.model.checkpoint import (TRAINING_STATE, CheckpointError, check_checkpoint_target, load_checkpoint,
                                     read_config, save_checkpoint, step_dirs)
from backend.model.config import PRESETS, ConfigError
from backend.model.precision import autocast_context
from backend.model.tokenizer import MIN_VOCAB_SIZE, Tokenizer, TokenizerError, train_tokenizer
from backend.model.vocabulary import TrainingWords, VocabularyError

from . import device_images
from . import recipe as recipes
from .data import (DataError, expand_urls, show_skipped_images_plainly,
                   skipping_unreadable_image, unreadable_listing)
from .signals import stop_signals_interrupt
from .vocabulary import training_words
from .augment import AUGMENTATIONS


@dataclass
class TrainConfig:
    out: str = "runs/default"
    preset: str = "small"
    init_checkpoint: str | None = None       # fine-tune from these weights (and their tokenizer)
    tokenizer: str | None = None             # tokenizer.json; trained from the training captions if absent
    vocab_size: int = 8192
    conv_stem: bool = False
    image_size: int | None = None            # train (and save) at this resolution (default: the preset's / init's)
    steps: int = 1000
    batch_size: int = 64                     # global batch per optimizer step
    grad_accum: int = 1
    lr: float = 5e-4                         # the command line's default from scratch (FINE_TUNE_LR from a checkpoint)
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta2: float = 0.98
    grad_clip: float = 1.0
    contrastive_weight: float | None = None  # default: the model config's
    caption_weight: float | None = None
    class_aware: bool = False                # same-class in-batch pairs are positives (UniCL)
    augment: str = "overhead"                # image augmentation: overhead | none (training.augment)
    template_mix: float = 0.0                # P(caption -> one of its class's templates)
    freeze_image: bool = False               # locked-image tuning: only the text decoder and temperature learn
    images_on_device: bool = False           # decode the images once into a bank on the device, augment there
    bank_size: int | None = None             # the bank's side in pixels (default: the training resolution)
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    precision: str = "auto"                  # auto | fp32 | bf16
    compile: bool = False
    grad_checkpointing: bool = False
    fsdp: bool = False
    save_every: int = 500
    keep_last: int = 3
    eval_every: int = 0
    time_budget: float = 0.0                 # minutes of training; >0 shortens --steps (and the schedule) to fit
    log_every: int = 10
    resume: bool = False
    export_fp16: str | None = None           # also write the final weights as an fp16 checkpoint here
    sources: list = field(default_factory=list)   # data sources (see training/recipe.py)
    # the command line's word on the learning rate and warm-up it chose, logged once the data is read
    # (a data error is then the only line); no setting, so not recorded
    schedule_note: str = ""


# ---- distributed setup (torchrun env vars) --------------------------------------------------------
def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg.startswith("cuda"):
        device = torch.device("cuda", local_rank if world > 1 else (torch.device(device_arg).index or 0))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def config_record(cfg: TrainConfig) -> dict:
    """The run's settings as checkpoints and train_config.json record them; a source's inline caption
    pool (a packed recipe's, often thousands of captions) is recorded by its size alone, and
    --export-fp16 as an absolute path."""
    record = asdict(cfg)
    del record["schedule_note"]
    if record["export_fp16"]:
        # absolute: the run folder names its export to whoever looks from another directory
        # (backend.model.checkpoint.run_folder_hint)
        record["export_fp16"] = os.path.abspath(record["export_fp16"])
    for s in record["sources"]:
        pool = s.get("caption_pool")
        if isinstance(pool, dict) and isinstance(pool.get("captions"), dict):
            s["caption_pool"] = {**pool, "captions": f"{sum(map(len, pool['captions'].values()))} captions "
                                                     f"of {len(pool['captions'])} classes, inline"}
    return record


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log(msg: str) -> None:
    if is_main():
        # through tqdm: a line logged while the progress bar runs (a validation's) starts a line of its
        # own instead of running on from the bar's, and the bar is drawn again below it
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)
        sys.stderr.flush()


# ---- optimisation ---------------------------------------------------------------------------------
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matmul/conv weights only: not on biases, norms, embeddings of positions,
    the pooling query or the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(("pos_embed", "query", "logit_scale")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def freeze_image_tower(model: torch.nn.Module) -> None:
    """Locked-image tuning: the ViT and its attention pool stop learning, so every image embedding
    (and SAO's dense path) stays what the starting checkpoint computes; the text decoder (both
    passes) and the temperature go on learning. No gradient flows into the image tower, so a step
    also costs less."""
    for part in (model.visual, model.attn_pool):
        for p in part.parameters():
            p.requires_grad_(False)


# The command line's peak learning rate with --init-checkpoint and no --lr: the pre-training rate
# (TrainConfig.lr) moves a trained model far in a few steps (RSSCN7 zero-shot top-1 of the default fell
# from 92.9 to 18.6 and 25.7 in two runs of 3 steps of 8 at 5e-4 with no warm-up); the measured continuations of the default
# ran at 8e-5 to 1.2e-4 (Makefile train-default-stage6..8, README "Training").
FINE_TUNE_LR = 1e-4
# The default warm-up: a tenth of --steps, at least WARMUP_FLOOR steps (all of a shorter run), at most
# TrainConfig.warmup_steps: a short run does not start at the peak rate.
WARMUP_FLOOR = 5


def default_warmup(steps: int, most: int = TrainConfig.warmup_steps) -> int:
    return min(most, max(steps // 10, min(steps, WARMUP_FLOOR)))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def steps_in_budget(budget_min: float, step: int, spent_s: float, s_per_step: float) -> int | None:
    """How many steps in all end within `budget_min` minutes: the steps up to `step` took `spent_s`
    seconds, the rest go at `s_per_step`. None without a budget or a pace."""
    if budget_min <= 0 or s_per_step <= 0:
        return None
    return step + int(max(0.0, budget_min * 60 - spent_s) / s_per_step)


def fit_steps_to_budget(asked: int, fit: int | None, warmup: int, step: int) -> int:
    """The run's total steps, given the `fit` that end within the time budget (steps_in_budget; None:
    no budget). Never more than `asked`, never fewer than the steps already done (`step`) or the
    warm-up plus one."""
    if fit is None:
        return asked
    return max(min(asked, fit), step, min(asked, warmup + 1))


class TimeBudget:
    """Shortens cfg.steps so that this process's training steps fit --time-budget minutes; the
    cosine schedule follows the new total. From step SKIP on (the first steps include start-up work:
    they are counted at the measured pace) it estimates after 1, 2, 4, ... measured steps and then
    every EVERY steps, with the time spent so far and the pace since the last estimate for the rest,
    until half the budget is spent: later changes would bend the schedule near its end. (Estimates
    come early, so a budget that holds a few dozen slow steps is kept, and its schedule decays.) The
    cadence counts steps, not seconds, and every process takes rank 0's estimate, so all stop at the
    same step."""

    SKIP, EVERY = 10, 50

    def __init__(self, cfg: TrainConfig, start_step: int):
        self.cfg, self.start_step, self.asked = cfg, start_step, cfg.steps
        self.logged = cfg.steps
        self.t0: float | None = None
        self.t_last = 0.0
        self.measured_last = 0
        self.frozen = False
        self.warned_warmup = False

    def update(self, step: int, device) -> bool:
        """Call after each step; True when cfg.steps changed."""
        if self.frozen or step < self.start_step + self.SKIP:
            return False
        now = time.time()
        if self.t0 is None:
            self.t0 = self.t_last = now
            return False
        measured = step - self.start_step - self.SKIP
        early = measured < self.EVERY and measured & (measured - 1) == 0      # 1, 2, 4, ... 32
        if not early and measured % self.EVERY:
            return False
        elapsed = now - self.t0
        spent = elapsed * (step - self.start_step) / measured   # the skipped steps at the measured pace
        recent = (now - self.t_last) / (measured - self.measured_last)
        self.t_last, self.measured_last = now, measured
        fit = steps_in_budget(self.cfg.time_budget, step, spent, recent)
        steps = fit_steps_to_budget(self.asked, fit, self.cfg.warmup_steps, step)
        if fit is not None and fit < self.cfg.warmup_steps + 1 < self.asked and not self.warned_warmup and is_main():
            # fit_steps_to_budget's floor: the run goes on to the end of the warm-up and a step more
            self.warned_warmup = True
            log(f"warning: time budget {self.cfg.time_budget:g} min holds fewer steps than the warm-up "
                f"({self.cfg.warmup_steps}): the run goes on to step {steps}, past the budget, and ends at the "
                "peak learning rate, with no decay; give a longer --time-budget or a shorter --warmup-steps")
        frozen = elapsed >= self.cfg.time_budget * 30   # half the budget (minutes x 60 / 2)
        if dist.is_initialized():
            # rank 0's estimate and its decision to stop estimating, together: ranks that froze at
            # different steps would stop calling broadcast at different steps and hang
            t = torch.tensor([steps, int(frozen)], device=device)
            dist.broadcast(t, 0)
            steps, frozen = int(t[0].item()), bool(t[1].item())
        self.frozen = frozen
        if steps == self.cfg.steps:
            return False
        if abs(steps - self.logged) > 0.02 * self.logged or self.frozen:
            log(f"time budget {self.cfg.time_budget:g} min: {steps} steps fit (asked for {self.asked}); "
                "the schedule ends there")
            self.logged = steps
        self.cfg.steps = steps
        return True


# ---- data order ------------------------------------------------------------------------------------
class StepBatchSampler(torch.utils.data.Sampler):
    """This rank's slice of each global batch from optimizer step `start` on, epoch after epoch,
    as (epoch, index) keys for EpochItems; endless.

    Each epoch's global order is a permutation seeded by (seed, epoch), independent of the world
    size, so resuming mid-epoch and changing the number of processes both keep the same sample order.
    """

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, start: int = 0):
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.start = seed, start
        self.per_rank = global_batch // world
        self.steps_per_epoch = n // global_batch

    def __iter__(self):
        step = self.start
        while True:
            epoch, first = divmod(step, self.steps_per_epoch)
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            for b in range(first, self.steps_per_epoch):
                chunk = perm[b * self.global_batch:(b + 1) * self.global_batch]
                yield [(epoch, i) for i in chunk[self.rank * self.per_rank:(self.rank + 1) * self.per_rank].tolist()]
            step = (epoch + 1) * self.steps_per_epoch


class EpochItems(torch.utils.data.Dataset):
    """A map-style dataset's items keyed (epoch, index): one DataLoader, so one set of workers, serves
    the whole run, and each worker's copy of the dataset changes epoch when the keys do. (A loader
    per epoch started its workers again every epoch: on a GPU with a small dataset, seconds of every
    few.)"""

    def __init__(self, dataset):
        self.dataset, self.epoch = dataset, None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if epoch != self.epoch:
            self.dataset.set_epoch(epoch)
            self.epoch = epoch
        return self.dataset[index]


def batch_stream(dataset, cfg: TrainConfig, rank: int, world: int, start_step: int, collate, pin_memory: bool):
    """Endless batches (this rank's slice of each global batch) from optimizer step `start_step` on.

    Map-style data resumes exactly: step -> (epoch, batch in epoch). Streaming shards cannot seek,
    so after a resume they restart with a new shuffle (seeded by the step) instead.
    """
    per_rank = cfg.batch_size // world
    if isinstance(dataset, torch.utils.data.IterableDataset):
        epoch = start_step
        while True:
            dataset.set_epoch(epoch)
            batches, skipped = 0, 0
            for batch in DataLoader(dataset, batch_size=per_rank, num_workers=cfg.workers, collate_fn=collate,
                                    drop_last=True, pin_memory=pin_memory):
                if len(batch["images"]) == 0:
                    # a batch of unreadable samples only is no batch: its count goes with the next one
                    skipped += batch["skipped"]
                    continue
                batches += 1
                batch["skipped"] += skipped
                skipped = 0
                yield batch
            if batches == 0:
                # else the next pass gives nothing either, and training waits forever
                raise DataError(f"a whole pass over the shards gave no batch of {per_rank} samples: the shards hold "
                                "fewer usable samples than that (see the warnings above); check them or lower "
                                "--batch-size")
            epoch += 1
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, rank, world, cfg.seed, start_step)
    yield from DataLoader(EpochItems(dataset), batch_sampler=sampler, num_workers=cfg.workers, collate_fn=collate,
                          pin_memory=pin_memory)


# ---- checkpoints -----------------------------------------------------------------------------------
def checkpoint_dirs(out: Path) -> list[Path]:
    return step_dirs(out / "checkpoints")


def clean_partial_checkpoints(out: Path) -> None:
    """Remove temp directories a killed save left behind (complete checkpoints are renamed into place)."""
    root = out / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)


def set_aside_checkpoints(out: Path, skipped: list[Path]) -> None:
    """Rename checkpoints --resume could not read to `unreadable_step_N` (kept for a look, never
    deleted): this run saves new ones in their place, and --keep-last counts this run's only."""
    if is_main():
        for ckpt in skipped:
            aside = ckpt.with_name(f"unreadable_{ckpt.name}")
            n = 1
            while aside.exists():
                n += 1
                aside = ckpt.with_name(f"unreadable_{ckpt.name}_{n}")
            ckpt.rename(aside)
            log(f"moved it aside to {aside}")
    if dist.is_initialized():
        dist.barrier()


def unwrap(model: torch.nn.Module) -> MaMMUT:
    model = getattr(model, "_orig_mod", model)       # torch.compile
    return getattr(model, "module", model)          # DDP


def full_state_dict(model: torch.nn.Module, fsdp: bool) -> dict:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict()


def whole_model(model: MaMMUT, gathered: dict | None, device) -> MaMMUT:
    """The model with every parameter whole on the main process, for evaluation and export: itself,
    or under FSDP an unsharded copy built from the state `full_state_dict` gathered from every rank
    (which only the main process receives)."""
    if gathered is None or not is_main():
        return model
    copy = MaMMUT(model.config)
    copy.load_state_dict(gathered)
    return copy.to(device).eval()


def save_training_checkpoint(out: Path, model, optimizer, tokenizer: Tokenizer, cfg: TrainConfig, step: int,
                             fsdp: bool, words: TrainingWords | None = None, gathered: dict | None = None) -> Path | None:
    """Save a resumable checkpoint; under FSDP pass the step's `gathered` weights if they are at hand
    (gathering them costs a full copy in host memory and a collective over every rank)."""
    state = gathered if gathered is not None else full_state_dict(model, fsdp)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opt_state = get_optimizer_state_dict(model, optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        opt_state = optimizer.state_dict()
    path = None
    if is_main():
        holder = MaMMUT(unwrap(model).config)
        holder.load_state_dict(state)
        path = out / "checkpoints" / f"step_{step:07d}"

        def write_state(tmp: Path) -> None:
            torch.save({"optimizer": opt_state, "step": step, "config": asdict(cfg)}, tmp / TRAINING_STATE)
            if words is not None:
                words.save(tmp)

        save_checkpoint(holder, tokenizer, path, extra={"step": step, "train_config": config_record(cfg)},
                        write_extra=write_state, training_state=True)
        # --resume moved any later-numbered, unreadable checkpoint aside, so the newest are this run's
        for old in checkpoint_dirs(out)[:-cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return path


class OutputError(Exception):
    """--out cannot be written."""


class UnreadableImages:
    """The unreadable images a run meets. Training images: each named once in the log as it is first met
    (the first NAMED of them; past that they are counted), and all listed at the end, in OUT/FILE. The
    batches carry them (collate_captions' "unreadable") to the main process: the datasets' own warnings
    name an image once per DataLoader worker, each with its own copy of the dataset, and print over the
    progress bar. Under DDP each process's are gathered to the main one at the log steps. Held-out
    images that validation leaves out are listed in OUT/FILE too, as soon as they are found.

    OUT/FILE is the run's: a resumed run lists the images of its earlier parts with its own, and a run
    that starts afresh in OUT removes the list an earlier run left there."""

    NAMED = 20
    FILE = "unreadable_images.txt"

    def __init__(self, out: Path, resuming: bool):
        self.listing = out / self.FILE
        self.met: dict[str, str] = {}           # training images: path -> why, in the order met
        self.held_out: dict[str, str] = {}      # held-out images validation leaves out
        self.earlier: dict[str, str] = {}       # those the run's earlier parts listed
        self.pending: list = []       # this process's, not yet reported
        if is_main() and resuming:
            self.earlier = self._read_listing()
        elif is_main():
            self.listing.unlink(missing_ok=True)

    def _read_listing(self) -> dict[str, str]:
        """The list the run's earlier parts wrote (path -> why); {} where there is none to read."""
        try:
            lines = self.listing.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return {}
        return dict(line.split("\t", 1) for line in lines if "\t" in line)

    def named_before(self, images: dict[str, str]) -> None:
        """Training images named before training (by the image bank): not named again."""
        self.met.update(images)

    def leave_out_of_validation(self, val_sets: dict) -> None:
        """Main process: leave the unreadable held-out images out of validation, name and list them."""
        self.held_out = leave_out_unreadable_held_out_images(val_sets, self.listing)
        self.write()

    def write(self) -> None:
        """Main process: list every unreadable image met so far in OUT/FILE (path and why, a tab between)."""
        every = {**self.earlier, **self.held_out, **self.met}
        if every:
            write_text_atomically(self.listing, "".join(f"{path}\t{why}\n" for path, why in every.items()))

    def add(self, batch: dict) -> None:
        self.pending += batch.get("unreadable", ())

    def report(self, world: int) -> None:
        """Name the images met since the last report; under DDP a collective, which every rank calls at
        the same step."""
        pending, self.pending = self.pending, []
        if world > 1:
            parts: list = [None] * world
            dist.all_gather_object(parts, pending)
            pending = [pair for part in parts for pair in part]
        if not is_main():
            return
        for path, why in pending:
            if path in self.met:
                continue
            self.met[path] = why
            if len(self.met) <= self.NAMED:
                log(f"warning: {skipping_unreadable_image(path, why)}")
            elif len(self.met) == self.NAMED + 1:
                log(f"warning: more than {self.NAMED} unreadable images: the others are counted, not named here; "
                    "the end of the run lists them all")

    def summary(self) -> None:
        """Main process, at the end of the run: how many unreadable training images it met, and where
        the list is."""
        if not self.met:
            return
        self.write()
        shown = ", ".join(list(self.met)[:3]) + (", ..." if len(self.met) > 3 else "")
        with_earlier = " with those of the run's earlier part(s)" if self.earlier else ""
        log(f"{len(self.met)} unreadable image(s) were left out of training, each replaced by another image "
            f"({shown}): all are listed in {self.listing}{with_earlier}; remove or replace them")


# ---- the loop -----------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    rank, world, device = setup_distributed(cfg.device)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise SystemExit(f"error: --batch-size {cfg.batch_size} must be divisible by processes x --grad-accum "
                         f"({world} x {cfg.grad_accum})")
    if is_main():
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot make --out {out}: {e.strerror or e}") from None
        if not os.access(out, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write in --out {out}: read-only or not yours; give another folder")
        clean_partial_checkpoints(out)
    if dist.is_initialized():
        dist.barrier()

    # -- resume / init ---------------------------------------------------------------------------
    start_step, opt_state, tokenizer, model = 0, None, None, None
    if cfg.resume:
        unreadable = []
        for ckpt in reversed(checkpoint_dirs(out)):
            try:
                model, tokenizer = load_checkpoint(ckpt)
                try:
                    state = torch.load(ckpt / TRAINING_STATE, map_location="cpu", weights_only=False)
                except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
                    # torch names no file ("Ran out of input" for an empty one)
                    raise CheckpointError(f"its {TRAINING_STATE} cannot be read ({e})") from None
            except (CheckpointError, OSError, RuntimeError, EOFError) as e:
                log(f"skipping unreadable checkpoint {ckpt}: {e}")
                unreadable.append(ckpt)
                model = None
                continue
            start_step, opt_state = state["step"], state["optimizer"]
            saved_fsdp = bool(state.get("config", {}).get("fsdp"))
            if cfg.fsdp and not saved_fsdp:
                # its optimizer state is keyed by parameter number, FSDP's by name: they do not load
                raise CheckpointError(f"{ckpt} was trained without --fsdp: resume it without --fsdp, or start a "
                                      "new --out from it with --init-checkpoint (the optimizer state starts afresh)")
            log(f"resuming from {ckpt} (step {start_step})")
            if cfg.image_size and cfg.image_size != model.config.image_size:
                raise CheckpointError(f"{out} trains at {model.config.image_size} px (its checkpoints); --image-size "
                                      f"{cfg.image_size} with --resume would mix the two: leave --image-size out, "
                                      "or start a new --out from --init-checkpoint")
            fitted = state.get("config", {}).get("steps")
            if cfg.time_budget > 0 and isinstance(fitted, int) and start_step <= fitted < cfg.steps:
                # the first run fitted its schedule to the budget: finish that schedule, not a new one
                log(f"time budget: keeping the {fitted} steps the run's schedule was fitted to")
                cfg.steps, cfg.time_budget = fitted, 0.0
            break
        else:
            log(f"no checkpoint in {out / 'checkpoints'}: starting from "
                + (f"--init-checkpoint {cfg.init_checkpoint}" if cfg.init_checkpoint else "scratch"))
        # on every rank, whatever it saw: the lists differ when one rank lists the folder after
        # rank 0 renamed, and the barrier inside must be reached by all
        set_aside_checkpoints(out, unreadable)
    train_sources, val_sets = recipes.build_sources(cfg.sources, seed=cfg.seed)
    if model is not None and cfg.resume:
        changed = recipes.changed_validation_lists(cfg.sources, val_sets, out / "val")
        if changed:
            # another --seed, --val-per-class or data than the run's: its held-out images would be
            # trained on from here, and images it trained on would be held out
            raise recipes.RecipeError(
                f"--resume would hold out other images than the run in {out} did ({', '.join(changed)} in "
                f"{out / 'val'} would change): give the --seed, --val-per-class and data the run started with, "
                "or start a new --out (with --init-checkpoint to start from its weights)")
    if is_main() and val_sets:
        recipes.write_validation_lists(cfg.sources, val_sets, out / "val")
    if is_main():
        warn_of_classes_without_images(train_sources, val_sets)
    unreadable_images = UnreadableImages(out, resuming=start_step > 0)
    if is_main() and cfg.eval_every:
        unreadable_images.leave_out_of_validation(val_sets)
    if is_main() and cfg.eval_every and not val_sets:
        log(f"warning: --eval-every {cfg.eval_every} has nothing to validate: no images are held out (give "
            "--val-per-class N, or a recipe source with val_per_class)")
    if model is None:
        if cfg.init_checkpoint:
            try:
                model, tokenizer = load_checkpoint(cfg.init_checkpoint)
            except CheckpointError as e:
                raise CheckpointError(f"--init-checkpoint: {e}") from None
            if cfg.image_size and cfg.image_size != model.config.image_size:
                # the checkpoint records the resolution it learned at (measured better than serving
                # a 128 px-trained model at its starting checkpoint's 224 px)
                log(f"{cfg.init_checkpoint} is a {model.config.image_size} px checkpoint: training and "
                    f"saving at {cfg.image_size} px")
                model.set_image_size(cfg.image_size)
        else:
            tokenizer = _get_tokenizer(cfg, out, train_sources)
            overrides = {"vocab_size": max(tokenizer.vocab_size, 8)}
            if cfg.image_size:
                # the checkpoint records the resolution it learned at: the backend tiles at it
                overrides["image_size"] = cfg.image_size
            if cfg.conv_stem:
                overrides["patch_stem"] = "conv"
            model = MaMMUT(get_preset(cfg.preset, **overrides))
    words = run_words(cfg, train_sources) if is_main() else None
    mcfg = model.config
    image_size = cfg.image_size or mcfg.image_size
    # the training loop names replaced images once, from the batches (UnreadableImages): the datasets
    # do not warn of them, in each loader process's copy
    dataset = recipes.make_dataset(train_sources, image_size, mcfg, seed=cfg.seed, class_aware=cfg.class_aware,
                                   augment=cfg.augment, template_mix=cfg.template_mix, warn_of_replaced=False)
    streaming = isinstance(dataset, torch.utils.data.IterableDataset)
    if not streaming and len(dataset) < cfg.batch_size:
        raise recipes.RecipeError(f"{len(dataset)} training samples are fewer than one batch of {cfg.batch_size}")
    bank = bank_augment = None
    if cfg.images_on_device:
        parts = device_images.caption_datasets(dataset)
        bank = device_images.ImageBank.build(parts, cfg.bank_size or image_size, device, workers=cfg.workers,
                                             progress=is_main(), rank=rank, world=world)
        bank_augment = device_images.BankAugment(parts[0].transform)    # what the loader would have done
        log(f"image bank: {bank.images.shape[0] - bank.unreadable} images at {bank.side} px on {device} "
            f"({bank.images.numel() / 2**20:.0f} MiB)" + (f", {bank.unreadable} unreadable (skipped)"
                                                          if bank.unreadable else ""))
        # the bank named its unreadable images as it decoded them
        unreadable_images.named_before({r.image: "it could not be decoded into the image bank" for d in parts
                                        for r, row in zip(d.records, d.image_rows) if row < 0})

    model.to(device).train()
    if cfg.freeze_image:
        freeze_image_tower(model)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    loss_fn = MaMMUTLoss(
        cfg.contrastive_weight if cfg.contrastive_weight is not None else mcfg.contrastive_weight,
        cfg.caption_weight if cfg.caption_weight is not None else mcfg.caption_weight,
        mcfg.pad_id,
    )
    train_model: torch.nn.Module = model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in list(model.visual.blocks) + list(model.text.blocks):
            fully_shard(block)
        # the temperature is one scalar, which FSDP cannot shard: kept whole on every rank, its
        # gradient averaged by hand after each backward pass
        fully_shard(model, ignored_params={model.logit_scale})
    elif world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, cfg.beta2),
                                  eps=1e-6, fused=device.type == "cuda")
    if opt_state is not None:
        if cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict, StateDictOptions

            set_optimizer_state_dict(model, optimizer, opt_state, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(opt_state)

    precision = cfg.precision
    amp = autocast_context(device) if precision == "auto" else (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    metrics_path = out / "metrics.jsonl"
    if is_main():
        (out / "train_config.json").write_text(json.dumps(config_record(cfg), indent=2) + "\n")
        # also at step 0: rows of a run stopped before its first checkpoint (resumed or not) would
        # otherwise stay, and this run would log steps 1, 2, 3... a second time
        dropped = _truncate_metrics(metrics_path, start_step)
        if dropped:
            log(f"{metrics_path}: dropped {dropped} row(s) past step {start_step}, logged by an earlier run "
                "after the checkpoint this run starts from (or with none)")
        size = "streaming shards" if streaming else f"{len(dataset)} samples, {len(dataset) // cfg.batch_size} steps/epoch"
        log(f"MaMMUT {mcfg.preset}: {model.num_params() / 1e6:.1f}M params | {size} | {world} process(es) on {device} | global batch {cfg.batch_size}"
            f" | {image_size}px | precision {precision}")
        if cfg.schedule_note:
            log(cfg.schedule_note)

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=start_step, disable=not is_main(), dynamic_ncols=True, unit="step")
    stream = batch_stream(dataset, cfg, rank, world, start_step, recipes.Collate(tokenizer, mcfg.context_length),
                          pin_memory=device.type == "cuda")
    last: dict = {}
    t_log, samples_since, skipped_total = time.time(), 0, 0
    budget = TimeBudget(cfg, start_step) if cfg.time_budget > 0 else None
    step = start_step
    whole = gathered = None   # the step's whole model (for validation) and FSDP-gathered weights
    while step < cfg.steps:
        step += 1
        lr = lr_at(step - 1, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        batch = _readable_batch(stream, world, device)
        images = batch["images"].to(device, non_blocking=True)
        if bank is not None:   # bank rows -> this step's augmented pixels
            images = bank_augment(bank.images[images],
                                  bank_augment.step_params(cfg.seed, step, cfg.batch_size, rank, world))
        tokens = batch["tokens"].to(device, non_blocking=True)
        labels = batch.get("labels")  # only with --class-aware (and sources that know classes)
        skipped_total += batch["skipped"]
        unreadable_images.add(batch)
        if world == 1 or step % cfg.log_every == 0 or step == cfg.steps:
            unreadable_images.report(world)    # under DDP a collective: at the log steps, which every rank shares
        parts: dict[str, float] = {}
        # micro-batches cut from the batch as it came: a streamed batch shortened by unreadable
        # samples gives smaller (or fewer) ones, never an empty one, whose loss is NaN; each part's
        # loss is weighted by its share of the batch, so the step's loss is the batch mean
        n = len(images)
        n_micro = min(cfg.grad_accum, n)
        if streaming and world > 1:
            # the same number on every rank: under FSDP each forward and backward is a collective
            t = torch.tensor([n_micro], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            n_micro = int(t.item())
        bounds = [n * i // n_micro for i in range(n_micro + 1)]     # n_micro parts, none empty
        slices = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
        is_ddp = isinstance(train_model, torch.nn.parallel.DistributedDataParallel)
        for i, sl in enumerate(slices):
            # gradients are all-reduced only on the last micro-batch
            ctx = train_model.no_sync() if is_ddp and i < len(slices) - 1 else contextlib.nullcontext()
            share = (sl.stop - sl.start) / n
            with ctx, amp:
                losses = loss_fn(train_model(images[sl], tokens[sl]), tokens[sl],
                                 labels[sl] if labels is not None else None)
            (losses["loss"] * share).backward()
            for k, v in losses.items():
                parts[k] = parts.get(k, 0.0) + float(v.detach()) * share
        if cfg.fsdp and world > 1 and model.logit_scale.grad is not None:
            dist.all_reduce(model.logit_scale.grad)
            model.logit_scale.grad /= world
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        samples_since += cfg.batch_size
        if world > 1:
            t = torch.tensor([parts["loss"], parts["contrastive_loss"], parts["caption_loss"]], device=device)
            dist.all_reduce(t)
            parts = dict(zip(["loss", "contrastive_loss", "caption_loss"], (t / world).tolist()))
        last = {"step": step, "lr": lr, **parts,
                "logit_scale": float(model.logit_scale.detach().clamp(max=mcfg.max_logit_scale).exp()),
                "grad_norm": float(grad_norm) if grad_norm is not None else None}
        bar.update(1)
        if budget is not None and budget.update(step, device):
            bar.total = cfg.steps
            bar.refresh()
        if step % cfg.log_every == 0 or step == cfg.steps:
            dt = time.time() - t_log
            last["samples_per_s"] = samples_since / max(dt, 1e-9)
            last["skipped_images"] = skipped_total
            if world > 1:       # every rank's, as one process would count them
                t = torch.tensor([skipped_total], device=device)
                dist.all_reduce(t)
                last["skipped_images"] = int(t.item())
            t_log, samples_since = time.time(), 0
            bar.set_postfix(loss=f"{parts['loss']:.3f}", con=f"{parts['contrastive_loss']:.3f}",
                            cap=f"{parts['caption_loss']:.3f}", sps=f"{last['samples_per_s']:.1f}")
            _append_metrics(metrics_path, {"kind": "train", **last})
        evaluate_now = bool(cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps) and val_sets)
        save_now = step % cfg.save_every == 0 or step == cfg.steps
        if cfg.fsdp and (evaluate_now or save_now or (cfg.export_fp16 and step == cfg.steps)):
            # the whole weights, gathered once for this step's validation, checkpoint and export
            gathered = full_state_dict(train_model, True)
        if evaluate_now:
            whole = whole_model(model, gathered, device)
            _evaluate(whole, tokenizer, val_sets, device, metrics_path, step)
            model.train()
        if save_now:
            save_training_checkpoint(out, train_model if cfg.fsdp else model, optimizer, tokenizer, cfg, step,
                                     cfg.fsdp, words, gathered=gathered)
        if step < cfg.steps:    # only the last step's are kept, for the export: a whole model's copy
            whole = gathered = None
    bar.close()
    if cfg.export_fp16 and cfg.fsdp and step == start_step:
        gathered = full_state_dict(train_model, True)   # no step ran here (resumed at the last one)
    final = model
    if cfg.export_fp16:
        final = whole if whole is not None else whole_model(model, gathered, device)
    if cfg.export_fp16 and is_main():
        save_checkpoint(final, tokenizer, cfg.export_fp16, dtype=torch.float16,
                        extra={"step": step, "train_config": config_record(cfg)},
                        write_extra=words.save if words is not None else None)
        log(f"wrote fp16 checkpoint {cfg.export_fp16}")
    if is_main():
        unreadable_images.summary()
        saved = checkpoint_dirs(out)
        if saved and cfg.export_fp16:
            log(f"done: the final checkpoint is {saved[-1]}; its fp16 export, to serve, is {cfg.export_fp16}")
        elif saved:
            log(f"done: the final checkpoint is {saved[-1]}; `python -m training.export {saved[-1]} DIR --fp16` "
                "makes a serving checkpoint of it")
    if dist.is_initialized():
        # the DDP/FSDP wrapper holds the process group: drop it first, so no gloo work object outlives
        # the group into interpreter shutdown (a rank aborted there at exit, once, after training)
        del train_model
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return last


def _truncate_metrics(path: Path, step: int) -> int:
    """Drop rows past `step` (what a killed run logged after its last checkpoint), so a resumed
    run's metrics.jsonl holds each step once; step 0 starts the file afresh. Returns the rows dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) > step:
                continue
        except (json.JSONDecodeError, AttributeError):
            continue   # a line cut short by the kill
        keep.append(line)
    if len(keep) != len(lines):
        write_text_atomically(path, "".join(k + "\n" for k in keep))
    return len(lines) - len(keep)


def _append_metrics(path: Path, row: dict) -> None:
    if is_main():
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def _evaluate(model: MaMMUT, tokenizer: Tokenizer, val_sets: dict, device, metrics_path: Path, step: int) -> None:
    if not is_main():
        return
    from . import evaluate as ev

    model.eval()
    row = {"kind": "eval", "step": step}
    for name, vs in val_sets.items():
        try:
            if vs["kind"] == "zero-shot":
                r = ev.evaluate_zero_shot(model, tokenizer, vs["records"], vs["classnames"], device, batch_size=64)
                row[f"{name}/top1"] = r["top1"]
            else:
                r = ev.evaluate_retrieval(model, tokenizer, vs["records"], device, batch_size=64)
                row[f"{name}/mean_recall"] = r["mean_recall"]
                row[f"{name}/t2i_r10"] = r["t2i_r10"]
        except (ev.EvalError, OSError) as e:   # a validation set gone bad must not end hours of training
            log(f"validation of {name} failed at step {step}: {e}")
            row[f"{name}/error"] = str(e)
    log("eval " + json.dumps(row))
    _append_metrics(metrics_path, row)


def warn_of_classes_without_images(train_sources: list[dict], val_sets: dict) -> None:
    """Name the classes of each source's class map that have no image (an empty folder, a map entry
    with no folder): most often a mistake, and one a run would not show, as such a class has nothing
    to train but still lowers its source's zero-shot validation as a candidate."""
    for s in train_sources:
        held_out = val_sets.get(s["name"], {}).get("records", [])
        missing = recipes.classes_without_images(s, held_out)
        if missing:
            log(f"warning: source {s['name']}: {len(missing)} class(es) of its class-name map have no images: "
                f"{', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}; they are not trained on, but are "
                "candidates in its zero-shot validation: add their images, or leave them out of the map")


def leave_out_unreadable_held_out_images(val_sets: dict, listing: Path | None = None) -> dict[str, str]:
    """Validation scores the held-out images that can be read, as `training.evaluate` scores them: one
    that cannot is named here and left out (the held-out lists in OUT/val keep it), where it would fail
    every validation of its set. Returns them (path -> why); the warning names the first few and says
    they are all in `listing`."""
    from .evaluate import leave_out_unreadable

    every = {}
    for name, vs in val_sets.items():
        vs["records"], unreadable = leave_out_unreadable(vs["records"])
        if unreadable:
            log(f"warning: validation of {name} leaves out {len(unreadable)} unreadable held-out image(s): "
                + unreadable_listing(unreadable, f"all are listed in {listing}" if listing else ""))
        every.update(unreadable)
    return every


def run_words(cfg: TrainConfig, train_sources: list[dict]) -> TrainingWords | None:
    """The words this run trains on, plus those of the checkpoint it starts from (its words.json);
    None when shards are among the sources (streamed, not counted: no list beats a partial one,
    which would call every word of the shards unfamiliar)."""
    if any(s.get("kind") == "shards" for s in train_sources):
        log("shard sources are not counted: the checkpoints get no words.json")
        return None
    words = training_words(train_sources, "training captions of this run")
    if cfg.init_checkpoint:
        try:
            before = TrainingWords.load(cfg.init_checkpoint)
        except VocabularyError as e:
            log(f"{e}: its words are not carried over")
            before = None
        if before is not None:
            words = TrainingWords(Counter(before.counts) + Counter(words.counts),
                                  f"{before.source} + training captions of this run")
    return words


def _get_tokenizer(cfg: TrainConfig, out: Path, sources) -> Tokenizer:
    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)
    path = out / "tokenizer.json"
    if dist.is_initialized() and not is_main():
        dist.barrier()
        return Tokenizer.load(path)
    # what the tokenizer was trained from, beside it: one left by an earlier attempt into this --out
    # (stopped before its first checkpoint) is reused only for the same captions and vocabulary size
    source_path = out / "tokenizer_source.json"
    stored = _read_tokenizer_source(source_path) if path.is_file() else None
    inputs = _caption_inputs(sources)
    tok = None
    if stored is not None and stored.get("vocab_size") == cfg.vocab_size and stored.get("inputs") == inputs:
        # the same shard files and the same other captions: the same captions, known without a
        # pass over the shards' text
        tok = Tokenizer.load(path)
    else:
        texts = list(recipes.caption_texts(sources))
        source = {"captions": len(texts), "vocab_size": cfg.vocab_size,
                  "sha256": hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()}
        if stored is not None and {k: stored.get(k) for k in source} == source:
            tok = Tokenizer.load(path)      # shard files copied or touched, their text the same
        elif path.is_file():
            log(f"{path} is not from this run's captions and --vocab-size (an earlier run's): replacing it")
        if tok is None:
            log(f"training a tokenizer on {len(texts)} captions (at most --vocab-size {cfg.vocab_size} tokens) -> {path}")
            tok = train_tokenizer(texts, vocab_size=cfg.vocab_size)
            tok.save(path)
            # a few captions give fewer tokens than asked (a piece must recur to become one): the size it got
            log(f"the tokenizer has {tok.vocab_size} tokens" + (" (the captions have too few recurring pieces for "
                                                                 "more)" if tok.vocab_size < cfg.vocab_size else ""))
        # with the inputs as they are now, so the next run compares them, not the text
        source_path.write_text(json.dumps({**source, "inputs": inputs}) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return tok


def _caption_inputs(sources) -> list[dict]:
    """Where each training source's captions come from, in a form cheap to compare between runs:
    each shard file's path, size and modification time (reading their text is a pass over the
    shards), and a hash of another source's captions (read into memory already)."""
    inputs = []
    for s in sources:
        if s["kind"] == "shards":
            files = []
            for shard in expand_urls(s["urls"]):
                try:
                    st = os.stat(shard)
                    files.append([os.path.abspath(shard), st.st_size, st.st_mtime_ns])
                except OSError:
                    files.append([os.path.abspath(shard), None, None])   # missing: read as no captions
            inputs.append({"shards": files})
        else:
            digest = hashlib.sha256()
            for r in s.get("records", []):
                for c in r.captions:
                    digest.update(c.encode("utf-8") + b"\n")
            inputs.append({"captions_sha256": digest.hexdigest()})
    return inputs


def _read_tokenizer_source(path: Path) -> dict | None:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) else None


# ---- command line ---------------------------------------------------------------------------------
def launched_as_rank_zero() -> bool:
    """Whether torchrun started this process as rank 0 (or no launcher did), known before the process
    group exists: what every process finds alike (a command line's mistake) is said by this one only."""
    return int(os.environ.get("RANK", "0")) == 0


class RankZeroArgumentParser(argparse.ArgumentParser):
    """Under torchrun every process parses the same command line: its mistakes are said once, by rank
    0, and every process exits with the same status."""

    def error(self, message):
        if launched_as_rank_zero():
            super().error(message)
        sys.exit(2)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = RankZeroArgumentParser(
        prog="python -m training.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    data = p.add_argument_group(
        "data (folders, manifests and a --recipe combine freely; --shards train alone: fine-tune a model trained "
        "on the others with --init-checkpoint)")
    data.add_argument("--recipe", help="JSON file listing data sources (see training/recipe.py)")
    data.add_argument("--folder", action="append", default=[], metavar="ROOT",
                      help="folder of class sub-folders; pair each with a --classnames")
    data.add_argument("--classnames", action="append", default=[], metavar="MAP",
                      help="class-name map: a JSON file (folder -> name) or a bundled one (rsscn7, ucm, aid); one "
                           "per --folder, in order, or, with no --folder, one per --manifest (its lines' \"class\")")
    data.add_argument("--manifest", action="append", default=[], metavar="FILE",
                      help="JSONL/CSV manifest of image paths and captions")
    data.add_argument("--shards", action="append", default=[], metavar="PATTERN",
                      help="WebDataset tar shards, e.g. 'data/shard-{000..099}.tar'")
    data.add_argument("--val-per-class", type=int, default=0,
                      help="hold out this many images per class of each --folder/--manifest source for "
                           "validation (not with --recipe: its sources set their own \"val_per_class\")")
    model = p.add_argument_group("model")
    # no default here: a preset given beside --resume or --init-checkpoint is checked against the checkpoint's
    model.add_argument("--preset", choices=list(PRESETS),
                       help=f"model size (default {d.preset}; with --resume or --init-checkpoint: the checkpoint's)")
    model.add_argument("--init-checkpoint", help="start from these weights (fine-tuning)")
    model.add_argument("--tokenizer", help="tokenizer.json (default: train one on the training captions)")
    model.add_argument("--vocab-size", type=int, default=None,
                       help=f"tokens of the tokenizer trained on the captions (default {d.vocab_size}; not with "
                            "--tokenizer or --init-checkpoint, whose tokenizer is used)")
    model.add_argument("--conv-stem", action="store_true", help="convolutional stem instead of one patch conv")
    model.add_argument("--image-size", type=int,
                       help="training resolution, which the checkpoint records and the backend tiles at "
                            "(default: the preset's, or the --init-checkpoint's)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default %(default)s)")
    opt.add_argument("--batch-size", type=int, default=d.batch_size,
                     help="images per step, over all processes (default %(default)s)")
    opt.add_argument("--grad-accum", type=int, default=d.grad_accum,
                     help="micro-batches each step's batch is split into, to fit memory (default %(default)s)")
    opt.add_argument("--warmup-steps", type=int,
                     help=f"steps of linear learning-rate warm-up before the cosine decay (default: a tenth of "
                          f"--steps, at least {WARMUP_FLOOR} (all of a shorter run), at most {d.warmup_steps}; "
                          "with --resume, the run's own)")
    opt.add_argument("--seed", type=int, default=d.seed, help="seed of the data order and the weights (default %(default)s)")
    opt.add_argument("--workers", type=int, default=d.workers, help="data loader processes (default %(default)s)")
    opt.add_argument("--lr", type=float,
                     help=f"peak learning rate (default {d.lr:g} from scratch, {FINE_TUNE_LR:g} with --init-checkpoint: "
                          "the pre-training rate undoes much of a trained model in a few steps; with --resume, the "
                          "run's own)")
    opt.add_argument("--min-lr", type=float, default=d.min_lr,
                     help="learning rate at the end of the cosine decay (default %(default)s)")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default %(default)s)")
    opt.add_argument("--beta2", type=float, default=d.beta2, help="AdamW beta2 (default %(default)s)")
    opt.add_argument("--grad-clip", type=float, default=d.grad_clip,
                     help="gradient norm clip, 0: off (default %(default)s)")
    shipped = get_preset(d.preset)     # the weights every preset has, and --init-checkpoint's config may change
    opt.add_argument("--contrastive-weight", type=float,
                     help=f"weight of the contrastive loss (default: the model config's, "
                          f"{shipped.contrastive_weight:g} in the presets)")
    opt.add_argument("--caption-weight", type=float,
                     help=f"weight of the captioning loss (default: the model config's, {shipped.caption_weight:g} "
                          "in the presets)")
    opt.add_argument("--class-aware", action="store_true",
                     help="contrastive positives include every in-batch pair of the same class (UniCL): "
                          "class-template captions stop being false negatives of each other. Classes come "
                          "from folder and manifest sources, named by their class maps (shards have none: refused)")
    opt.add_argument("--augment", default=d.augment, choices=AUGMENTATIONS,
                     help="overhead: random resized crop, the 8 flips/rotations, mild colour jitter; none: "
                          "resize + centre crop as at evaluation (default %(default)s)")
    opt.add_argument("--template-mix", type=float, default=d.template_mix, metavar="P",
                     help="caption dropout: with probability P an image of a known class is captioned with one "
                          "of its class templates instead of its own caption (default %(default)s)")
    opt.add_argument("--freeze-image", action="store_true",
                     help="locked-image tuning from --init-checkpoint: the image tower and its attention pool stay "
                          "as they are (image embeddings unchanged), only the text decoder and the temperature "
                          "learn; cheaper steps, for teaching the text side new wording")
    opt.add_argument("--images-on-device", action="store_true",
                     help="decode every training image once into a bank in the device's memory and augment each "
                          "batch there (the same augmentation, in one pass): for GPUs that the data loader's "
                          "processes cannot keep busy; folder and manifest sources only")
    opt.add_argument("--bank-size", type=int, metavar="PX",
                     help="side of the bank's images with --images-on-device (default: --image-size); a larger "
                          "one keeps detail for crops at a low training resolution")
    opt.add_argument("--device", default=d.device, help="auto | cpu | cuda[:N] (default %(default)s: a GPU if there is one)")
    opt.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16"],
                     help="auto = bf16 autocast on GPUs and CPUs that compute bf16 natively (Ampere or later; AVX512-BF16/AMX), "
                          "else fp32")
    opt.add_argument("--compile", action="store_true", help="torch.compile the model")
    opt.add_argument("--grad-checkpointing", action="store_true")
    opt.add_argument("--fsdp", action="store_true", help="shard parameters with FSDP2 (fully_shard) for base/large")
    run = p.add_argument_group("run")
    run.add_argument("--out", default=d.out,
                     help="run directory: checkpoints/step_*, metrics.jsonl, the tokenizer (default %(default)s)")
    run.add_argument("--save-every", type=int, default=d.save_every,
                     help="save a checkpoint every N steps, and at the end (default %(default)s)")
    run.add_argument("--keep-last", type=int, default=d.keep_last, help="checkpoints kept (default %(default)s)")
    run.add_argument("--eval-every", type=int, default=d.eval_every,
                     help="validate every N steps on the held-out images (--val-per-class, or a recipe's "
                          "val_per_class; 0: off; default %(default)s)")
    run.add_argument("--log-every", type=int, default=d.log_every, help="log every N steps (default %(default)s)")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    run.add_argument("--export-fp16", metavar="DIR", help="also write the final model as an fp16 checkpoint")
    run.add_argument("--time-budget", type=float, default=d.time_budget, metavar="MIN",
                     help="minutes the training steps may take: after a few steps, --steps (and the learning-rate "
                          "schedule with it) is cut to what fits at the measured pace, never past --steps "
                          "(default: off)")
    a = p.parse_args(argv)
    try:
        sources = recipes.sources_from_args(a.recipe, a.folder, a.classnames, a.manifest, a.shards, a.val_per_class)
        recipes.check_source_mix(sources, a.class_aware)     # before a tokenizer is trained on them
    except recipes.RecipeError as e:
        p.error(str(e))
    for name, least in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("save_every", 1), ("log_every", 1),
                        ("keep_last", 1), ("warmup_steps", 0), ("workers", 0), ("eval_every", 0),
                        ("vocab_size", MIN_VOCAB_SIZE), ("val_per_class", 0)):
        if getattr(a, name) is not None and getattr(a, name) < least:
            why = " (the special tokens and the 256 byte tokens)" if name == "vocab_size" else ""
            p.error(f"--{name.replace('_', '-')} must be at least {least}{why}, not {getattr(a, name)}")
    schedule_said = learning_rate_defaults(a, d)
    if a.warmup_steps > a.steps:
        print(f"warning: --warmup-steps {a.warmup_steps} is longer than --steps {a.steps}: the learning rate "
              f"never reaches --lr {a.lr:g}; leave --warmup-steps out for the default ({default_warmup(a.steps)} "
              "here)", file=sys.stderr)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if a.batch_size % (world * a.grad_accum):
        p.error(f"--batch-size {a.batch_size} must be divisible by processes x --grad-accum ({world} x {a.grad_accum})")
    if not a.lr > 0 or a.min_lr < 0 or a.min_lr > a.lr:
        p.error(f"learning rates: give --lr > 0 and 0 <= --min-lr <= --lr (got {a.lr} and {a.min_lr})")
    if a.weight_decay < 0 or a.grad_clip < 0 or not 0 < a.beta2 < 1:
        p.error("give --weight-decay >= 0, --grad-clip >= 0 (0: off) and 0 < --beta2 < 1")
    try:
        resolve_device(a.device)
    except EngineError as e:
        p.error(f"--device: {e}")
    out = Path(a.out)
    # checked by every process, before they meet: found by rank 0 alone, the others would fail at
    # their next collective with a gloo traceback
    blocking = file_in_the_way(out / "val")
    if blocking == out:
        p.error(f"--out {a.out} is a file; the run directory must be a folder")
    if blocking is not None:
        p.error(f"--out {a.out}: {blocking} is a file, where the run's folders go; give another --out")
    if (out / "config.json").is_file() or (out / "model.safetensors").is_file():
        # a run there would write its own tokenizer.json over the one the checkpoint's model reads with
        p.error(f"--out {a.out} is a checkpoint folder: a run there would replace its tokenizer. To fine-tune "
                f"that model, give --init-checkpoint {a.out} and a new --out")
    earlier = checkpoint_dirs(out)
    if earlier and not a.resume:
        p.error(f"--out {a.out} already holds a run (checkpoints up to {earlier[-1].name}): add --resume "
                "to continue it, or give another --out (a new run there would mix the two)")
    start = earlier[-1] if earlier and a.resume else Path(a.init_checkpoint) if a.init_checkpoint else None
    check_tokenizer_options(p, a, start, resuming=bool(earlier and a.resume))
    a.vocab_size = a.vocab_size or d.vocab_size
    shape = None
    if start is not None:
        # the model's shape comes from that checkpoint: another one asked for here would be dropped
        # unsaid, and the run's records name the checkpoint's preset
        try:
            shape = read_config(start)
        except CheckpointError:
            shape = None   # training names it (--resume sets an unreadable checkpoint aside)
        if shape is not None:
            a.preset = a.preset or shape.preset
            keep = ("leave it out to continue this run, or give another --out for a new one" if start in earlier
                    else "leave it out to fine-tune this model, or leave --init-checkpoint out to train from scratch")
            if a.preset is not None and a.preset != shape.preset:
                p.error(f"--preset {a.preset}: {start} is a {shape.preset} model; {keep}")
            if a.conv_stem and shape.patch_stem != "conv":
                p.error(f"--conv-stem: {start} is a model with a {shape.patch_stem} patch stem; {keep}")
    a.preset = a.preset or d.preset
    if a.image_size is not None:
        patch = (shape or get_preset(a.preset)).patch_size
        if a.image_size < patch or a.image_size % patch:
            p.error(f"--image-size {a.image_size}: give a positive multiple of the model's patch size, {patch} "
                    f"(for example {max(patch, round(a.image_size / patch) * patch)})")
    if not a.time_budget >= 0 or a.time_budget == float("inf"):     # nan too
        p.error(f"--time-budget is in minutes: give a positive number (or 0 for none), not {a.time_budget}")
    if a.fsdp and int(os.environ.get("WORLD_SIZE", 1)) < 2:
        p.error("--fsdp shards the model across processes: start the run with torchrun --nproc_per_node=N "
                "(N >= 2), or leave --fsdp out")
    if a.bank_size is not None and (a.bank_size < 8 or not a.images_on_device):
        p.error(f"--bank-size {a.bank_size}: give a side of at least 8 px, with --images-on-device")
    if a.freeze_image and not a.init_checkpoint:
        p.error("--freeze-image keeps the image tower of --init-checkpoint: give one (a random tower would stay random)")
    if not 0.0 <= a.template_mix <= 1.0:
        p.error(f"--template-mix is a probability: give a value in [0, 1], not {a.template_mix}")
    if a.export_fp16:
        try:   # checked now, not after hours of training
            check_checkpoint_target(Path(a.export_fp16))
        except CheckpointError as e:
            p.error(f"--export-fp16: {e}")
    kw = {k: v for k, v in vars(a).items() if k in TrainConfig.__dataclass_fields__}
    return TrainConfig(**kw, sources=sources, schedule_note=schedule_said)


def recorded_config(out: Path) -> dict:
    """The settings a run in `out` recorded (train_config.json); {} where none can be read."""
    try:
        recorded = json.loads((out / "train_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def learning_rate_defaults(a, d: TrainConfig) -> str:
    """Set --lr and --warmup-steps where not given; the line that says which were chosen and why.
    Given ones are kept as they are. --resume of a run goes on with its own (OUT/train_config.json),
    so a changed default never changes a run's schedule halfway; otherwise a fine-tune
    (--init-checkpoint) peaks at FINE_TUNE_LR, a run from scratch at TrainConfig.lr, and the warm-up is
    default_warmup(--steps)."""
    recorded = recorded_config(Path(a.out)) if a.resume and checkpoint_dirs(Path(a.out)) else {}
    own = f"the run's own ({Path(a.out) / 'train_config.json'})"
    if a.lr is not None:
        lr_why = "--lr"
    elif isinstance(recorded.get("lr"), (int, float)) and not isinstance(recorded.get("lr"), bool):
        a.lr, lr_why = float(recorded["lr"]), f"{own}; --lr sets another"
    elif a.init_checkpoint:
        a.lr, lr_why = FINE_TUNE_LR, (f"the fine-tuning default with --init-checkpoint, not the {d.lr:g} of a run "
                                      "from scratch; --lr sets another")
    else:
        a.lr, lr_why = d.lr, "the default from scratch; --lr sets another"
    if a.warmup_steps is not None:
        warm_why = "--warmup-steps"
    elif isinstance(recorded.get("warmup_steps"), int) and not isinstance(recorded.get("warmup_steps"), bool):
        a.warmup_steps, warm_why = recorded["warmup_steps"], f"{own}; --warmup-steps sets another"
    else:
        a.warmup_steps = default_warmup(a.steps, d.warmup_steps)
        warm_why = (f"the default: a tenth of --steps, at least {WARMUP_FLOOR} (all of a shorter run), at most "
                    f"{d.warmup_steps}; --warmup-steps sets another")
    return (f"learning rate: peak {a.lr:g} ({lr_why}); {a.warmup_steps} warm-up step(s) ({warm_why}), "
            "then cosine decay to --min-lr")


def check_tokenizer_options(p: argparse.ArgumentParser, a, start: Path | None, resuming: bool) -> None:
    """--tokenizer and --vocab-size where a run would use them, refused (not dropped) where it would not:
    a checkpoint brings its own tokenizer, whose tokens its model's embeddings index."""
    if a.tokenizer and a.vocab_size is not None:
        p.error(f"--vocab-size {a.vocab_size} sizes the tokenizer a run trains on its captions; --tokenizer gives one: "
                "leave --vocab-size out")
    if start is None:
        return
    if not resuming:
        for option, given in (("--tokenizer", a.tokenizer), ("--vocab-size", a.vocab_size)):
            if given is not None:
                p.error(f"{option}: --init-checkpoint {a.init_checkpoint} brings its own tokenizer, which its model's "
                        f"embeddings index: leave {option} out")
        return
    # resuming: the run's own tokenizer; the first run's command given again is fine
    own = Path(a.out) / "tokenizer.json"
    if a.tokenizer and own.is_file() and Path(a.tokenizer).is_file() and Path(a.tokenizer).read_bytes() != own.read_bytes():
        p.error(f"--tokenizer {a.tokenizer} is not the tokenizer of the run in --out ({own}), which --resume goes on "
                "with: leave --tokenizer out")
    recorded = recorded_config(Path(a.out)).get("vocab_size")
    if a.vocab_size is not None and not a.tokenizer and recorded is not None and a.vocab_size != recorded:
        p.error(f"--vocab-size {a.vocab_size}: the run in --out trained its tokenizer with {recorded}, and --resume "
                "goes on with it: leave --vocab-size out")


# consecutive batches of nothing but unreadable images after which a run stops: its images are not there
EMPTY_BATCHES_LIMIT = 50


def _readable_batch(stream, world: int, device) -> dict:
    """The next batch with an image in it. A batch whose every image was unreadable is drawn again (on
    every rank at once, since each step is a collective there); after EMPTY_BATCHES_LIMIT of them in a
    row the images are said to be unreadable, naming the first few, instead of a step on nothing (a
    division by zero). The batches drawn again pass on their counts and unreadable images."""
    skipped, unreadable = 0, []
    for _ in range(EMPTY_BATCHES_LIMIT):
        batch = next(stream)
        empty = torch.tensor([int(len(batch["images"]) == 0)], device=device)
        if world > 1:
            dist.all_reduce(empty, op=dist.ReduceOp.MAX)
        if not int(empty.item()):
            batch["skipped"] += skipped
            batch["unreadable"] = unreadable + list(batch.get("unreadable", ()))
            return batch
        skipped += batch["skipped"]
        unreadable += batch.get("unreadable", ())
    met = dict(unreadable)
    # the loader processes' own warnings of these images are off (UnreadableImages names them): so here
    which = (f"{len(met)} unreadable image(s) met: {unreadable_listing(met)}" if met else
             "see the warnings about unreadable images above")
    raise DataError(f"no image could be read in {EMPTY_BATCHES_LIMIT} batches in a row ({which}): check that the "
                    "training images are image files (PNG, JPEG, TIFF, ...) and not damaged")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    show_skipped_images_plainly()
    # a scheduler's or `timeout`'s SIGTERM (and a closed terminal's SIGHUP) stops the run as Ctrl-C does:
    # it says which checkpoint to resume from, where the signal's default would end it without a word
    stop_signals_interrupt()
    try:
        train(cfg)
    except (CheckpointError, recipes.RecipeError, ConfigError, DataError, OutputError, TokenizerError,
            VocabularyError) as e:
        if launched_as_rank_zero():         # each process finds the same: said once
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        saved = checkpoint_dirs(Path(cfg.out))
        if saved:
            log(f"interrupted: continue from {saved[-1].name} with the same command and --resume")
        else:
            log(f"interrupted before the first checkpoint (one every --save-every {cfg.save_every} steps): "
                "nothing to resume; run the command again")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
