"""The cloud engine: one loaded large VLM answering ``CloudRequest``s with SGP, in batches.

``CloudEngine`` owns the model through its ``BatchScheduler`` (one loop thread,
continuous batching). Callers go in two steps: ``prepare`` validates a request
and does its CPU work (image decode, tiling, prompt ids, kept positions) on the
caller's thread, then ``submit`` hands it to the loop, which reports tokens and
the result to the request's ``SequenceSink``; ``reply`` turns that result into
a ``CloudReply``. ``answer`` does all three and blocks (the in-process client
uses it). ``check_limits`` holds the checks that need no image or tokenizer
work, so a server can refuse before admitting a request.

Validation raises ``RequestError`` with the gRPC status to answer with. The
engine does no queue bounds, deadlines or auth (``server`` does), and knows
no wire messages.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import torch
from transformers import InternVLForConditionalGeneration

from ..shared.errors import RequestError, clip_text
from ..shared.layout import layout_fingerprint
from ..shared.model_files import ModelFiles
from ..shared.preprocess import decode_image, preprocess_image
from ..shared.prompt import build_prompt, check_chat_template, decode_answer
from ..shared.scoring import keep_count
from ..shared.types import CloudReply, CloudRequest, Timings
from .scheduler import BatchConfig, BatchScheduler, SequenceInput, SequenceResult, SequenceSink, StepObserver
from .sgp import SGPModel, kept_sequence_positions
from .text import StopRule

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# accelerate's placements for ``from_pretrained(device_map=...)``: the model's layers spread over the
# machine's GPUs (CPU and disk after them when they do not fit).
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def device_map_available() -> bool:
    """``from_pretrained(device_map=...)`` needs accelerate, which the cloud does not require."""
    return importlib.util.find_spec("accelerate") is not None


@dataclass(frozen=True)
class EngineConfig:
    """What the cloud serves and how."""

    model_dir: Path  # a Hugging Face InternVL checkpoint directory (loaded offline)
    prune_layer: float = 2  # K: layer index (int >= 0) or fraction of depth in (0, 1)
    device: str = "cpu"  # torch device, e.g. "cuda:0"
    dtype: str = "float32"  # float32 | float16 | bfloat16
    max_new_tokens_limit: int = 256  # largest generation budget a request may ask for
    # decoded images above this are refused; 16 Mpx (48 MB as RGB) is 3x a 12-tile InternVL grid's need
    max_image_pixels: int = 16_000_000
    model_id: str = ""  # id requests may name; defaults to the directory name
    max_batch_size: int = 8  # sequences decoded together in one forward pass
    max_batch_tokens: int = 8192  # prompt tokens prefilled per scheduler step
    # None: the whole model on ``device``; "auto" etc. (DEVICE_MAPS): accelerate spreads the layers over
    # the GPUs of this machine and ``device`` is not used (inputs go to the first layer's device)
    device_map: str | None = None
    # at most this many grid tiles per image (thumbnail not counted), below the checkpoint's max_tiles:
    # less vision work per request, fewer pixels seen; edges must use the same cap. None: the checkpoint's
    max_tiles: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        if self.max_tiles is not None and (isinstance(self.max_tiles, bool) or self.max_tiles < 1):
            raise ValueError(f"max_tiles must be >= 1 or None, got {self.max_tiles!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise ValueError(
                f"device_map must be one of {list(DEVICE_MAPS)} or None, got {self.device_map!r}"
            )
        if self.max_new_tokens_limit < 1:
            raise ValueError("max_new_tokens_limit must be >= 1")
        if self.max_image_pixels < 1:
            raise ValueError("max_image_pixels must be >= 1")
        BatchConfig(self.max_batch_size, self.max_batch_tokens)  # raises on bad batch settings

    @property
    def batch(self) -> BatchConfig:
        return BatchConfig(max_batch_size=self.max_batch_size, max_batch_tokens=self.max_batch_tokens)


@dataclass(eq=False)
class PreparedRequest:
    """A validated request and what its reply needs besides the generated tokens."""

    request: CloudRequest
    sequence: SequenceInput
    num_visual_tokens: int
    kept_visual_tokens: int
    prepare_s: float  # image decode + tiling + prompt ids


class CloudEngine:
    """A large InternVL model behind SGP and a batching loop, with the checkpoint's tokenizer and tiling."""

    def __init__(
        self,
        config: EngineConfig,
        files: ModelFiles,
        model: InternVLForConditionalGeneration,
        observer: StepObserver | None = None,
    ):
        self.config = config
        # the checkpoint's tiling, capped by the operator (ValueError above its max_tiles)
        self.files = files.with_max_tiles(config.max_tiles)
        self.sgp = SGPModel(model, config.prune_layer)
        self.model_id = config.model_id or files.model_id
        self.prune_layer = self.sgp.prune_layer
        self.max_context = files.max_context
        self.scheduler = BatchScheduler(self.sgp, config.batch, observer)
        # a token covers at most this many characters: a prompt longer than max_context times it
        # cannot fit, which ``check_limits`` can tell without tokenizing
        self._max_token_chars = max((len(t) for t in files.tokenizer.get_vocab()), default=1)

    @classmethod
    def load(cls, config: EngineConfig, observer: StepObserver | None = None) -> CloudEngine:
        """Load tokenizer, tiling and weights from ``config.model_dir`` (no hub access).

        Raises ``ValueError`` before touching the weights when the checkpoint's
        chat template cannot place the image (``check_chat_template``) or
        ``config.max_tiles`` is outside its ``min_tiles..max_tiles``. With
        ``config.device_map`` accelerate places the layers (``device`` unused).
        """
        files = ModelFiles.load(config.model_dir)
        files.with_max_tiles(config.max_tiles)  # a cap the checkpoint cannot take fails before the weights
        check_chat_template(files)
        options = {"dtype": DTYPES[config.dtype], "attn_implementation": "sdpa", "local_files_only": True}
        if config.device_map is None:
            model = InternVLForConditionalGeneration.from_pretrained(config.model_dir, **options)
            model = model.to(config.device)
        else:  # placed by accelerate; moving it with .to() would undo that
            model = InternVLForConditionalGeneration.from_pretrained(
                config.model_dir, device_map=config.device_map, **options
            )
        return cls(config, files, model, observer)

    def close(self) -> None:
        """Stop the batching loop; sequences still running get UNAVAILABLE."""
        self.scheduler.close()

    # ------------------------------------------------------------------ the request path

    def check_limits(self, request: CloudRequest) -> None:
        """The checks that need neither the image nor the tokenizer: model id, budget, prompt size."""
        if request.model and request.model != self.model_id:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"unknown model {clip_text(request.model)}; this server serves {self.model_id!r}",
            )
        limit = self.config.max_new_tokens_limit
        if not 1 <= request.max_new_tokens <= limit:
            raise RequestError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"max_new_tokens must be in 1..{limit}, got {request.max_new_tokens}",
            )
        fewest_tokens = len(request.prompt) // self._max_token_chars + request.num_visual_tokens
        if fewest_tokens + request.max_new_tokens > self.max_context:
            raise RequestError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"a prompt of {len(request.prompt)} characters and {request.num_visual_tokens} visual tokens "
                f"+ max_new_tokens {request.max_new_tokens} exceeds the context of {self.max_context} tokens",
            )

    def prepare(
        self,
        request: CloudRequest,
        sink: SequenceSink,
        should_stop: Callable[[], bool] | None = None,
        stop_error: Callable[[], RequestError] | None = None,
        record_logits: bool = False,
    ) -> PreparedRequest:
        """Validate ``request`` and build its sequence (CPU work: decode, tiling, prompt ids)."""
        t0 = time.monotonic()
        self.check_limits(request)
        image = decode_image(request.image, request.mime_type, max_pixels=self.config.max_image_pixels)
        pixel_values, layout = preprocess_image(image, self.files.tiling)
        del image  # only the tiles go on; the full-size copy is freed before the queue
        self._check_layout(request, layout)
        keep = _check_indices(request.kept_indices, layout.num_visual_tokens, request.retention)
        try:
            prompt = build_prompt(self.files, request.prompt, layout.num_visual_tokens)
        except ValueError as exc:  # e.g. special-token text that would move the visual span
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"prompt: {exc}") from exc
        needed = len(prompt.input_ids) + request.max_new_tokens
        if needed > self.max_context:
            raise RequestError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"prompt of {len(prompt.input_ids)} tokens + max_new_tokens {request.max_new_tokens} "
                f"exceeds the context of {self.max_context} tokens",
            )
        keep_positions = kept_sequence_positions(
            len(prompt.input_ids), prompt.visual_start, layout.num_visual_tokens, torch.from_numpy(keep)
        )
        rule = StopRule(
            eos_token_ids=frozenset(self.files.eos_token_ids),
            max_new_tokens=request.max_new_tokens,
            stop=request.sampling.stop,
            decode=partial(decode_answer, self.files),
        )
        sequence = SequenceInput(
            pixel_values=pixel_values,
            input_ids=np.array(prompt.input_ids),  # a writable copy
            keep_positions=keep_positions,
            rule=rule,
            sampling=request.sampling,
            sink=sink,
            should_stop=should_stop or (lambda: False),
            record_logits=record_logits,
        )
        if stop_error is not None:
            sequence.stop_error = stop_error
        return PreparedRequest(
            request=request,
            sequence=sequence,
            num_visual_tokens=layout.num_visual_tokens,
            kept_visual_tokens=len(keep),
            prepare_s=time.monotonic() - t0,
        )

    def submit(self, prepared: PreparedRequest) -> None:
        """Hand a prepared request to the batching loop (started on first use)."""
        self.scheduler.start()
        self.scheduler.submit(prepared.sequence)

    def reply(self, prepared: PreparedRequest, result: SequenceResult, received: float) -> CloudReply:
        """The reply for a finished sequence; ``received`` is when the request arrived (monotonic)."""
        ms = 1e3
        prepared_at = received + prepared.prepare_s
        return CloudReply(
            request_id=prepared.request.request_id,
            model=self.model_id,
            text=prepared.sequence.rule.answer_text(result.token_ids),
            token_ids=tuple(result.token_ids),
            prompt_tokens=result.prompt_tokens,
            pruned_prompt_tokens=result.pruned_prompt_tokens,
            num_visual_tokens=prepared.num_visual_tokens,
            kept_visual_tokens=prepared.kept_visual_tokens,
            prune_layer=self.prune_layer,
            finish_reason=result.finish_reason,
            timings=Timings(
                queue_ms=max(0.0, result.admitted_at - prepared_at) * ms,
                vision_ms=(prepared.prepare_s + result.vision_s) * ms,
                prefill_ms=result.prefill_s * ms,
                decode_ms=(result.finished_at - result.first_token_at) * ms,
                first_token_ms=(result.first_token_at - received) * ms,
                total_ms=(time.monotonic() - received) * ms,
            ),
        )

    def answer(self, request: CloudRequest, should_stop: Callable[[], bool] | None = None) -> CloudReply:
        """Validate, run in the batch, wait, and return the answer and its costs (blocking)."""
        received = time.monotonic()
        sink = _WaitingSink()
        prepared = self.prepare(request, sink, should_stop)
        self.submit(prepared)
        return self.reply(prepared, sink.wait(), received)

    def _check_layout(self, request: CloudRequest, layout) -> None:
        if request.num_visual_tokens != layout.num_visual_tokens:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"num_visual_tokens {request.num_visual_tokens} does not match the "
                f"{layout.num_visual_tokens} the cloud computes for this image: the edge sent "
                f"{_describe(request.layout)}, the cloud computes {_describe(layout)} with max_tiles="
                f"{self.files.tiling.max_tiles}; edge and cloud must tile alike (the same --max-tiles)",
            )
        fingerprint = layout_fingerprint(layout, self.files.tiling)
        if request.layout != layout or request.layout_fingerprint != fingerprint:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"layout mismatch: the edge sent {_describe(request.layout)} "
                f"(fingerprint {request.layout_fingerprint:016x}), the cloud computes "
                f"{_describe(layout)} (fingerprint {fingerprint:016x}) with max_tiles="
                f"{self.files.tiling.max_tiles}; edge and cloud must tile alike (the same --max-tiles)",
            )


class _WaitingSink:
    """A SequenceSink that a blocking caller waits on."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._result: SequenceResult | None = None
        self._error: RequestError | None = None

    def tokens(self, token_ids: list[int]) -> None:
        pass

    def finished(self, result: SequenceResult) -> None:
        self._result = result
        self._done.set()

    def failed(self, error: RequestError) -> None:
        self._error = error
        self._done.set()

    def wait(self) -> SequenceResult:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result


def _describe(layout) -> str:
    thumb = "+thumbnail" if layout.thumbnail else ""
    return (
        f"{layout.grid_columns}x{layout.grid_rows}{thumb} tiles of {layout.tile_size}px, "
        f"{layout.tokens_per_tile} tokens/tile"
    )


def _check_indices(indices: np.ndarray, num_visual: int, retention: float) -> np.ndarray:
    """Kept indices as int64, checked again here for callers that bypass the wire (in-process)."""
    keep = np.asarray(indices, dtype=np.int64).reshape(-1)
    if keep.size == 0:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "no visual token kept")
    if keep.min() < 0 or keep.max() >= num_visual:
        raise RequestError(grpc.StatusCode.OUT_OF_RANGE, f"kept index outside 0..{num_visual - 1}")
    if keep.size > 1 and not bool(np.all(np.diff(keep) > 0)):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "kept indices must be strictly ascending")
    expected = keep_count(retention, num_visual)
    if keep.size != expected:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"expected {expected} kept indices for R={retention} and |V|={num_visual}, got {keep.size}",
        )
    return keep
