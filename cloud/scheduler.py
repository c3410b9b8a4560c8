"""Continuous batching of pruned sequences: one loop owns the model and its cache.

``BatchScheduler`` runs on one thread (``start``) or is stepped by hand
(``step``, for tests). Each step:

1. sequences whose caller gave up (``should_stop``) leave: running rows free
   their cache row, waiting ones are refused;
2. waiting sequences are admitted while rows are free and their prompts fit
   the step's prefill budget (``max_batch_tokens``; the first always fits):
   their vision tower runs as one batch of tiles, their prompts are
   prefilled together, padded (``SGPModel.prefill_batch``: layers ``< K`` on
   the full prompts, ``>= K`` on the kept tokens), each first token chosen,
   and each prompt's KV appended as a new row;
3. one decode step advances every running row in a single forward pass
   (``SGPModel.decode_batch`` over a ``RowKVCache``); finished rows leave.

Each sequence talks back through its ``SequenceSink`` (tokens as they come,
then a result or an error), called on the scheduler thread. A failing step
fails only the sequences in it, with INTERNAL; the loop keeps serving. The
scheduler validates nothing (``engine.prepare`` did) and knows no wire
messages or tokenizers (``StopRule`` decides when a sequence ends).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import numpy as np
import torch
from transformers import DynamicCache

from ..shared.errors import RequestError
from ..shared.types import SamplingParams
from .batch_cache import RowKVCache
from .sampling import TokenChooser
from .sgp import SGPModel, _sync
from .text import StopRule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchConfig:
    """How much the loop runs at once."""

    max_batch_size: int = 8  # sequences decoding together (rows of the KV cache)
    max_batch_tokens: int = 8192  # prompt tokens prefilled per step (one longer prompt still runs alone)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")


@dataclass(frozen=True)
class SequenceResult:
    """What one finished sequence generated and where its time went (monotonic seconds)."""

    token_ids: list[int]
    finish_reason: str  # "eos" | "length" | "stop"
    prompt_tokens: int  # S
    pruned_prompt_tokens: int  # S' seen by layers >= K
    admitted_at: float  # left the queue (its vision tower started)
    vision_s: float  # its share of the batched vision tower + embedding
    prefill_s: float
    first_token_at: float
    finished_at: float
    step_logits: list[torch.Tensor] | None = None  # each [vocab] float32, when recorded


class SequenceSink(Protocol):
    """Where a sequence's progress goes; called on the scheduler thread, must not block."""

    def tokens(self, token_ids: list[int]) -> None: ...

    def finished(self, result: SequenceResult) -> None: ...

    def failed(self, error: RequestError) -> None: ...


@dataclass(eq=False)
class SequenceInput:
    """One validated request, ready to run (``engine.prepare`` builds it)."""

    pixel_values: np.ndarray  # [tiles, 3, H, W] float32
    input_ids: np.ndarray  # [S] int64, one image-context id per visual token
    keep_positions: torch.Tensor | None  # [S'] ascending positions going on at layer K; None = all
    rule: StopRule
    sampling: SamplingParams
    sink: SequenceSink
    should_stop: Callable[[], bool] = lambda: False  # True once the caller has gone (cancel, deadline)
    stop_error: Callable[[], RequestError] = lambda: RequestError(
        grpc.StatusCode.CANCELLED, "generation cancelled"
    )
    record_logits: bool = False  # keep each step's logits in the result (tests)


@dataclass(eq=False)
class _Running:
    seq: SequenceInput
    chooser: TokenChooser
    tokens: list[int]
    prompt_tokens: int
    pruned_prompt_tokens: int
    admitted_at: float
    vision_s: float
    prefill_s: float
    first_token_at: float
    logits: list[torch.Tensor] | None = field(default=None)

    @property
    def next_position(self) -> int:
        """Absolute position of the last token: decode continues from the full prompt length."""
        return self.prompt_tokens + len(self.tokens) - 1


class StepObserver(Protocol):
    def on_step(self, batch_size: int, new_tokens: int, seconds: float) -> None: ...


class BatchScheduler:
    """The model's one owner: admits, prefills and decodes sequences in batches."""

    def __init__(self, model: SGPModel, config: BatchConfig, observer: StepObserver | None = None) -> None:
        self.model = model
        self.config = config
        self.observer = observer
        self._cache = self._new_cache()
        self._running: list[_Running] = []  # row i of the cache
        self._waiting: collections.deque[SequenceInput] = collections.deque()
        self._cond = threading.Condition()
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._exit = False
        self._abort: RequestError | None = None  # set by abort_running, acted on at the next step

    def _new_cache(self) -> RowKVCache:
        return RowKVCache(self.model.num_layers, self.config.max_batch_size, self.model.max_context)

    # ------------------------------------------------------------------ submitting

    def submit(self, seq: SequenceInput) -> None:
        """Queue ``seq``; UNAVAILABLE once the scheduler stopped accepting work."""
        with self._cond:
            if not self._accepting:
                raise RequestError(
                    grpc.StatusCode.UNAVAILABLE, "server shutting down; retry on another replica"
                )
            self._waiting.append(seq)
            self._cond.notify()

    @property
    def counts(self) -> tuple[int, int]:
        """(waiting, running) sequences."""
        with self._cond:
            return len(self._waiting), len(self._running)

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        """Run the loop on a daemon thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="stitch-batch", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._running or self._exit or self._abort):
                    self._cond.wait()
                if self._exit:
                    return
            try:
                self.step()
            except Exception:  # a bug outside the guarded model calls: fail the batch, keep the loop
                log.exception("batching step failed; failing the %d running sequences", len(self._running))
                self._fail_all(RequestError(grpc.StatusCode.INTERNAL, "batching step failed"))

    @torch.inference_mode()  # the cache's buffers are made and written in inference mode alike
    def step(self) -> None:
        """One iteration: drop stopped sequences, admit and prefill, one decode step."""
        self._drop_stopped()
        self._admit()
        if self._running:
            self._decode()

    def stop_accepting(self) -> None:
        """Refuse new work and fail every waiting sequence with UNAVAILABLE; running ones go on."""
        with self._cond:
            self._accepting = False
            waiting, self._waiting = list(self._waiting), collections.deque()
        for seq in waiting:
            seq.sink.failed(
                RequestError(grpc.StatusCode.UNAVAILABLE, "server shutting down before this request started")
            )

    def abort_running(self, error: RequestError) -> None:
        """Fail every running sequence with ``error`` (after a drain's grace period)."""
        with self._cond:
            self._abort = error
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop thread after its current step; sequences still running get UNAVAILABLE."""
        self.stop_accepting()
        with self._cond:
            self._exit = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_all(RequestError(grpc.StatusCode.UNAVAILABLE, "server stopped"))

    # ------------------------------------------------------------------ steps

    def _drop_stopped(self) -> None:
        with self._cond:
            abort, self._abort = self._abort, None
        if abort is not None:
            self._fail_all(abort)
        stopped = [i for i, run in enumerate(self._running) if run.seq.should_stop()]
        for row in sorted(stopped, reverse=True):
            seq = self._running[row].seq
            self._remove_row(row)
            seq.sink.failed(seq.stop_error())
        with self._cond:
            gone = [seq for seq in self._waiting if seq.should_stop()]
            for seq in gone:
                self._waiting.remove(seq)
        for seq in gone:
            seq.sink.failed(seq.stop_error())

    def _take_admissions(self) -> list[SequenceInput]:
        free = self.config.max_batch_size - len(self._running)
        taken: list[SequenceInput] = []
        longest = 0
        with self._cond:
            while self._waiting and len(taken) < free:
                # prompts prefill together, padded to the longest: that is what the budget counts
                longest = max(longest, len(self._waiting[0].input_ids))
                if taken and (len(taken) + 1) * longest > self.config.max_batch_tokens:
                    break
                taken.append(self._waiting.popleft())
        return taken

    def _admit(self) -> None:
        taken = self._take_admissions()
        if not taken:
            return
        admitted_at = time.monotonic()
        stage = "vision tower"
        try:
            features = self._vision(taken)
            vision_s = (time.monotonic() - admitted_at) / len(taken)
            stage, t0 = "prefill", time.monotonic()
            embeds = [
                self.model.embed(torch.from_numpy(seq.input_ids), feats)  # [1, S, hidden]
                for seq, feats in zip(taken, features, strict=True)
            ]
            prefilled = self.model.prefill_batch(embeds, [seq.keep_positions for seq in taken])
        except Exception:
            log.exception("%s failed for %d sequences", stage, len(taken))
            for seq in taken:
                seq.sink.failed(RequestError(grpc.StatusCode.INTERNAL, f"{stage} failed"))
            return
        prefill_s = (time.monotonic() - t0) / len(taken)
        for seq, emb, (logits, cache, pruned) in zip(taken, embeds, prefilled, strict=True):
            self._join(seq, emb.shape[1], logits, cache, pruned, admitted_at, vision_s, prefill_s)

    def _vision(self, taken: list[SequenceInput]) -> list[torch.Tensor]:
        """Visual token embeddings of each sequence, from one vision-tower batch of all their tiles."""
        pixels = torch.from_numpy(np.concatenate([seq.pixel_values for seq in taken]))  # [tiles, 3, H, W]
        features = self.model.image_features(pixels)  # [tiles * tokens_per_tile, hidden]
        per_tile = features.shape[0] // pixels.shape[0]
        sizes = [seq.pixel_values.shape[0] * per_tile for seq in taken]
        return list(torch.split(features, sizes))

    def _join(
        self,
        seq: SequenceInput,
        prompt_tokens: int,
        logits: torch.Tensor,
        prefilled: DynamicCache,
        pruned: int,
        admitted_at: float,
        vision_s: float,
        prefill_s: float,
    ) -> None:
        """Choose a prefilled sequence's first token; unless that ends it, add it as a batch row."""
        chooser = TokenChooser(seq.sampling)
        token = chooser.choose(logits)
        _sync(self.model.device)
        now = time.monotonic()
        run = _Running(
            seq=seq,
            chooser=chooser,
            tokens=[token],
            prompt_tokens=prompt_tokens,
            pruned_prompt_tokens=pruned,
            admitted_at=admitted_at,
            vision_s=vision_s,
            prefill_s=prefill_s,
            first_token_at=now,
            logits=[logits.cpu()] if seq.record_logits else None,
        )
        seq.sink.tokens([token])
        if not self._finish_if_done(run):
            self._cache.append(prefilled)
            self._running.append(run)

    def _decode(self) -> None:
        t0 = time.monotonic()
        last = torch.tensor([run.tokens[-1] for run in self._running])
        positions = torch.tensor([run.next_position for run in self._running])
        try:
            logits = self.model.decode_batch(last, positions, self._cache)  # [rows, vocab]
            greedy = torch.argmax(logits, dim=-1).tolist()
        except Exception:
            log.exception("decode step failed for %d sequences", len(self._running))
            self._fail_all(RequestError(grpc.StatusCode.INTERNAL, "decode step failed"))
            return
        finished: list[int] = []
        for row, run in enumerate(self._running):
            token = greedy[row] if run.chooser.generator is None else run.chooser.choose(logits[row])
            run.tokens.append(token)
            if run.logits is not None:
                run.logits.append(logits[row].cpu())
            run.seq.sink.tokens([token])
            if self._finish_if_done(run):
                finished.append(row)
        batch = len(self._running)
        for row in sorted(finished, reverse=True):
            self._remove_row(row)
        if self.observer is not None:
            self.observer.on_step(batch, batch, time.monotonic() - t0)

    # ------------------------------------------------------------------ rows

    def _finish_if_done(self, run: _Running) -> bool:
        reason = run.seq.rule.finish_reason(run.tokens)
        if reason is None:
            return False
        run.seq.sink.finished(
            SequenceResult(
                token_ids=list(run.tokens),
                finish_reason=reason,
                prompt_tokens=run.prompt_tokens,
                pruned_prompt_tokens=run.pruned_prompt_tokens,
                admitted_at=run.admitted_at,
                vision_s=run.vision_s,
                prefill_s=run.prefill_s,
                first_token_at=run.first_token_at,
                finished_at=time.monotonic(),
                step_logits=run.logits,
            )
        )
        return True

    def _remove_row(self, row: int) -> None:
        """Free ``row``; the last row moves into it, in the cache and in ``_running`` alike."""
        self._cache.remove(row)
        last = self._running.pop()
        if row < len(self._running):
            self._running[row] = last

    def _fail_all(self, error: RequestError) -> None:
        """Fail every running sequence with ``error`` and start from an empty cache."""
        runs, self._running = self._running, []
        self._cache = self._new_cache()
        for run in runs:
            run.seq.sink.failed(error)
