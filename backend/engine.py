"""The model on one device, shared by every request.

`ModelEngine` loads a checkpoint and runs all model work on ONE worker thread fed by a small
queue. Concurrent requests put jobs on the queue; the worker merges waiting jobs of the same kind
(and the same settings) into one batch, so 32 clients asking for text embeddings cost about one
forward pass instead of 32 passes fighting over the device. GDAL reads stay in the callers'
threads, so IO for the next batch overlaps with compute of the current one.

A job whose caller has gone (cancelled gRPC call, deadline passed) is dropped before it runs.
A full queue fails fast with EngineError("resource_exhausted") instead of growing without bound.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .defaults import BUNDLED_CHECKPOINT, check_views
from .model.checkpoint import CheckpointError, checkpoint_hash, load_checkpoint
from .model.precision import autocast_context
from .model.prompts import ensemble_prompts, pool_ensemble
from .model.vocabulary import TrainingWords, VocabularyError

log = logging.getLogger("skyprompt.engine")


MAX_BATCH_IMAGES = 32       # images per forward pass (tiles of several requests share one)
MAX_BATCH_TEXTS = 256
# a tile's caption for keyword matching: the captions it trained on have about 12 words
TILE_CAPTION_TOKENS = 24
MERGE_WAIT_S = 0.002        # how long the worker waits for more jobs to join a batch


def out_of_memory(error: BaseException) -> bool:
    """Whether torch ran out of memory (CUDA's own error, or the CPU allocator's RuntimeError)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    text = str(error)
    return (bool(oom) and isinstance(error, oom)) or isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower()))


class EngineError(Exception):
    """Model work that cannot be done; `kind` is the gRPC status it maps to."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; "cuda[:N]" checked to exist."""
    text = (device or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise EngineError("invalid_argument", f"device {device!r} is not a torch device; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError("invalid_argument", f"device {device!r} asked for, but this machine (or this torch "
                                                  f"build) has no CUDA GPU; use --device cpu")
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            raise EngineError("invalid_argument", f"device {device!r}: only {torch.cuda.device_count()} GPU(s) visible")
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise EngineError("invalid_argument", f"device {device!r} is not supported; use auto, cpu or cuda[:N]")
    return dev


def _check_views(views: int) -> None:
    try:
        check_views(views)
    except ValueError as e:
        raise EngineError("invalid_argument", str(e)) from None


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclass
class _Job:
    kind: str                      # "image" | "text" | "relevance" | "caption" | "index"
    items: list                    # one entry per image / text
    settings: tuple = ()           # jobs merge only with equal kind and settings
    cancelled: Callable[[], bool] = lambda: False
    future: Future = field(default_factory=Future)


class ModelEngine:
    """A loaded checkpoint plus the worker that batches model work on its device."""

    def __init__(self, checkpoint: str | os.PathLike | None = None, device: str = "auto", max_queue: int = 1024,
                 threads: int | None = None):
        directory = Path(checkpoint) if checkpoint else BUNDLED_CHECKPOINT
        if not directory.exists():
            hint = ("no checkpoint is bundled with this installation; train one (make train-default) or pass "
                    "--checkpoint DIR") if checkpoint is None else "check the --checkpoint path"
            raise EngineError("not_found", f"checkpoint directory {directory} does not exist: {hint}")
        self.device = resolve_device(device)
        if threads:
            torch.set_num_threads(threads)
        try:
            # fp16 checkpoints are widened to fp32: half-precision matmuls on CPU are slow, and on
            # GPU bf16 autocast gives the speed without fp16's overflow risks.
            self.model, self.tokenizer = load_checkpoint(directory, device=self.device, dtype=torch.float32)
            self.checkpoint_hash = checkpoint_hash(directory)
        except CheckpointError as e:
            raise EngineError("invalid_argument", str(e)) from None
        except (RuntimeError, MemoryError) as e:
            # the device refused the model (a GPU busy in exclusive mode, a driver mismatch, no memory)
            raise EngineError("unavailable", f"cannot load the model on {self.device}: {e}; free the device, or "
                                             "start with another --device (e.g. cpu)") from None
        self.checkpoint_dir = directory.resolve()
        try:
            # optional: which words the checkpoint trained on, to tell a user which query words it barely knows
            self.words = TrainingWords.load(directory)
        except VocabularyError as e:
            log.warning("%s; searches will not point out unfamiliar words", e)
            self.words = None
        self.config = self.model.config
        self.image_size = self.config.image_size
        self.grid = self.config.grid_size
        self.embed_dim = self.config.embed_dim
        self.logit_scale = float(self.model.logit_scale.detach().clamp(max=self.config.max_logit_scale).exp())
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._pending: list[_Job] = []   # taken from the queue but not yet run (worker thread only)
        self._stopped = threading.Event()
        # taken by _call around its check-and-put and by stop() around its flag-and-wake, so that no
        # job slips into the queue after stop() has looked at it for the last time
        self._submit = threading.Lock()
        self.batches_run = 0
        self.items_run = 0
        self._worker = threading.Thread(target=self._run, name="skyprompt-model", daemon=True)
        self._worker.start()

    # -- public API: each call blocks until its job ran (or raises) --------------------------
    def embed_images(self, images: np.ndarray, cancelled: Callable[[], bool] = lambda: False,
                     views: int = 1) -> np.ndarray:
        """uint8 [N, 3, S, S] tiles -> L2-normalised float32 embeddings [N, E]; `views` > 1 averages
        each tile's flips / rotations (backend.model.views)."""
        _check_views(views)
        return np.stack(self._call("image", list(images), (views,), cancelled)) if len(images) else \
            np.zeros((0, self.embed_dim), np.float32)

    def embed_texts(self, texts: list[str], cancelled: Callable[[], bool] = lambda: False) -> np.ndarray:
        """Texts -> L2-normalised float32 embeddings [N, E]."""
        return np.stack(self._call("text", list(texts), (), cancelled))

    def embed_prompts(self, texts: list[str], ensemble: bool = True,
                      cancelled: Callable[[], bool] = lambda: False) -> np.ndarray:
        """A user's words -> L2-normalised float32 embeddings [N, E]. With `ensemble` (the default),
        each text is embedded under the zero-shot templates ("an aerial photo of ...", ...) and the
        phrasings averaged, as class names are in zero-shot evaluation; without it, as typed."""
        if not ensemble:
            return self.embed_texts(texts, cancelled)
        prompts, owner = ensemble_prompts(texts)
        pooled = pool_ensemble(torch.from_numpy(self.embed_texts(prompts, cancelled)), owner, len(texts))
        return pooled.numpy()

    def text_tokens(self, text: str) -> tuple[int, int]:
        """(tokens of `text` as typed, the most the text tower reads): past that the tokenizer cuts
        the text off without a word (under a prompt template, a few tokens sooner)."""
        return len(self.tokenizer.encode(text)), self.config.context_length - 2

    def relevance(self, images: np.ndarray, text_embeddings: np.ndarray, window: int, sigma: float,
                  cancelled: Callable[[], bool] = lambda: False) -> np.ndarray:
        """uint8 [N, 3, S, S] tiles x [T, E] texts -> cosine maps [N, T, G, G] (SAO, window in patches)."""
        key = (int(window), float(sigma), text_embeddings.astype(np.float32).tobytes())
        return np.stack(self._call("relevance", list(images), key, cancelled))

    def caption(self, image: np.ndarray, max_len: int, beam_size: int,
                cancelled: Callable[[], bool] = lambda: False) -> tuple[str, float]:
        """uint8 [3, S, S] -> (caption, mean log-probability per token of the caption, with its <eos>;
        see _mean_log_prob)."""
        return self._call("caption", [image], (int(max_len), int(beam_size)), cancelled)[0]

    def embed_and_describe(self, images: np.ndarray, views: int = 1, max_len: int = TILE_CAPTION_TOKENS,
                           cancelled: Callable[[], bool] = lambda: False) -> tuple[np.ndarray, list[str]]:
        """uint8 [N, 3, S, S] tiles -> (embed_images' embeddings, one greedy caption each: the words
        keyword matching finds a tile by, backend.keywords), from one pass of the image tower."""
        _check_views(views)
        if not len(images):
            return np.zeros((0, self.embed_dim), np.float32), []
        pairs = self._call("index", list(images), (views, int(max_len)), cancelled)
        return np.stack([e for e, _ in pairs]), [c for _, c in pairs]

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the job in hand, fail the queued ones with UNAVAILABLE, stop the worker."""
        with self._submit:
            self._stopped.set()
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass
        self._worker.join(timeout)
        left = [] if self._worker.is_alive() else list(self._pending)   # taken from the queue, never run
        while True:
            try:
                left.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in left:
            if job is not None and not job.future.done():
                job.future.set_exception(EngineError("unavailable", "the server is shutting down; retry later"))

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    # -- queue ---------------------------------------------------------------------------------
    def _call(self, kind: str, items: list, settings: tuple, cancelled: Callable[[], bool]) -> list:
        job = _Job(kind, items, settings, cancelled)
        with self._submit:
            if self._stopped.is_set():
                raise EngineError("unavailable", "the server is shutting down; retry later")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise EngineError("resource_exhausted", f"the model queue is full ({self._queue.maxsize} jobs "
                                                        "waiting); retry in a moment") from None
        while True:
            try:
                return job.future.result(timeout=0.25)
            except TimeoutError:
                if cancelled():
                    job.future.cancel()  # the worker skips it if it has not started
                    raise EngineError("cancelled", "the request was cancelled") from None
            except CancelledError:
                raise EngineError("cancelled", "the request was cancelled") from None

    def _next_job(self, timeout: float | None) -> _Job | None:
        if self._pending:
            return self._pending.pop(0)
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopped.is_set():
            job = self._next_job(timeout=0.5)
            if job is None:
                continue
            batch = [job]
            limit = MAX_BATCH_TEXTS if job.kind == "text" else MAX_BATCH_IMAGES
            size = len(job.items)
            if job.kind != "caption":
                deadline = time.monotonic() + MERGE_WAIT_S
                # Take what is waiting (or arrives within a moment); a job that does not fit this
                # batch is kept, in order, for the next one.
                while size < limit:
                    try:
                        other = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if other is None:
                        self._stopped.set()
                        break
                    if other.kind == job.kind and other.settings == job.settings and size + len(other.items) <= limit:
                        batch.append(other)
                        size += len(other.items)
                    else:
                        self._pending.append(other)
                        break
            live = [j for j in batch if j.future.set_running_or_notify_cancel() and not self._cancelled(j)]
            if not live:
                continue
            try:
                outputs = self._compute(job.kind, [item for j in live for item in j.items], job.settings)
            except Exception as e:  # noqa: BLE001 - every failure must reach the waiting callers
                if out_of_memory(e):
                    # the request's size, not a bug: said as what to ask for instead
                    log.error("model work ran out of memory on %s: %s", self.device, e)
                    error = EngineError("resource_exhausted", f"the model ran out of memory on {self.device} for this "
                                                              "request: ask for a smaller extent, fewer prompts or a "
                                                              "smaller SAO window, or try again when the server is "
                                                              "less busy")
                else:
                    log.exception("model work failed")
                    error = e if isinstance(e, EngineError) else EngineError("internal",
                                                                             f"model computation failed: {e}")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                for j in live:
                    j.future.set_exception(error)
                continue
            self.batches_run += 1
            self.items_run += len(outputs)
            start = 0
            for j in live:
                j.future.set_result(outputs[start:start + len(j.items)])
                start += len(j.items)
        # leave nothing hanging
        for j in self._pending:
            if not j.future.done():
                j.future.set_exception(EngineError("unavailable", "the server is shutting down; retry later"))
        self._pending.clear()

    @staticmethod
    def _cancelled(job: _Job) -> bool:
        try:
            if job.cancelled():
                job.future.set_exception(EngineError("cancelled", "the request was cancelled"))
                return True
        except Exception:  # noqa: BLE001 - a broken callback must not kill the worker
            return False
        return False

    # -- the actual model work (worker thread only) ----------------------------------------------
    def _images_tensor(self, items: list) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(np.stack(items))).to(self.device)
        return self.model.preprocess(x)

    def _compute(self, kind: str, items: list, settings: tuple) -> list:
        with torch.inference_mode(), autocast_context(self.device):
            if kind == "image":
                (views,) = settings     # one forward pass holds at most MAX_BATCH_IMAGES views
                return [row for chunk in _chunks(items, max(1, MAX_BATCH_IMAGES // views))
                        for row in self.model.encode_image(self._images_tensor(chunk), views=views).float().cpu().numpy()]
            if kind == "text":
                tokens = self.tokenizer(items, self.config.context_length).to(self.device)
                out = self.model.encode_text(tokens).float()
                return list(out.cpu().numpy())
            if kind == "relevance":
                window, sigma, text_bytes = settings
                text = torch.from_numpy(np.frombuffer(text_bytes, np.float32).reshape(-1, self.embed_dim).copy())
                text = text.to(self.device)
                return [m for chunk in _chunks(items, MAX_BATCH_IMAGES)
                        for m in self.model.sao_relevance_map(self._images_tensor(chunk), text, window, gaussian=sigma > 0,
                                                              sigma=sigma if sigma > 0 else None).float().cpu().numpy()]
            if kind == "index":
                views, max_len = settings
                out = []
                for chunk in _chunks(items, max(1, MAX_BATCH_IMAGES // views)):
                    emb, ids = self.model.encode_image_and_caption(self._images_tensor(chunk), max_len, views)
                    out += zip(emb.float().cpu().numpy(), (self.tokenizer.decode(i) for i in ids))
                return out
            if kind == "caption":
                max_len, beam_size = settings
                images = self._images_tensor(items)
                captions = self.model.caption(images, max_len=max_len, beam_size=beam_size, with_ended=True)
                return [(self.tokenizer.decode(ids), self._mean_log_prob(images[i:i + 1], ids, ended))
                        for i, (ids, ended) in enumerate(captions)]
        raise EngineError("internal", f"unknown model job kind {kind!r}")

    def _mean_log_prob(self, image: torch.Tensor, ids: list[int], ended: bool) -> float:
        """Mean log-probability per token of the caption the user sees, given the image, teacher-forced.

        `ids` are the generated tokens without <eos>; `ended`: the model generated an <eos> after
        them (False for a caption cut at max_len). The mean covers the tokens `tokenizer.decode`
        shows (`tokenizer.is_shown`: not <unk> or ids past its vocabulary) and that <eos>, when
        generated: as in sequence likelihood, choosing to stop is part of the caption.
        Every generated token stays in the decoder's input, so each counted one is scored in the
        context it was generated in. A caption with nothing to count scores -1e9, as a non-finite
        mean does.
        """
        cfg = self.config
        seq = [cfg.bos_id, *ids, *([cfg.eos_id] if ended else [])]
        shown = [self.tokenizer.is_shown(t) for t in ids] + ([True] if ended else [])
        if not any(shown):
            return -1e9
        tokens = torch.tensor([seq], device=self.device)
        logits = self.model.text.generative(tokens[:, :-1], self.model.visual(image)).float()
        logits[..., [cfg.bos_id, cfg.pad_id]] = float("-inf")     # as in generation: never chosen
        logp = logits.log_softmax(-1).gather(-1, tokens[:, 1:, None])[0, :, 0]
        value = float(logp[torch.tensor(shown, device=self.device)].mean())
        return value if math.isfinite(value) else -1e9
