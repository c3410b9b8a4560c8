"""The cloud engine: one loaded large VLM answering ``CloudRequest``s with SGP.

``CloudEngine.answer`` is blocking and transport-free: the gRPC servicer and the
in-process cloud client both call it. It validates everything about a request
that needs the model (image, layout, prompt length, generation budget, model
id) and raises ``RequestError`` with the gRPC status to answer with; it does no
queueing, deadlines or auth (``server`` does).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch
from transformers import InternVLForConditionalGeneration

from ..shared.errors import RequestError
from ..shared.layout import layout_fingerprint
from ..shared.model_files import ModelFiles
from ..shared.preprocess import decode_image, preprocess_image
from ..shared.prompt import build_prompt, decode_answer
from ..shared.scoring import keep_count
from ..shared.types import CloudReply, CloudRequest, Timings
from .sgp import GenerationCancelled, SGPModel, kept_sequence_positions

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EngineConfig:
    """What the cloud serves and how."""

    model_dir: Path  # a Hugging Face InternVL checkpoint directory (loaded offline)
    prune_layer: float = 2  # K: layer index (int >= 0) or fraction of depth in (0, 1)
    device: str = "cpu"  # torch device, e.g. "cuda:0"
    dtype: str = "float32"  # float32 | float16 | bfloat16
    max_new_tokens_limit: int = 256  # largest generation budget a request may ask for
    max_image_pixels: int = 40_000_000  # decoded images above this are refused (decompression bombs)
    model_id: str = ""  # id requests may name; defaults to the directory name

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.max_new_tokens_limit < 1:
            raise ValueError("max_new_tokens_limit must be >= 1")


class CloudEngine:
    """A large InternVL model behind SGP, with the checkpoint's tokenizer and tiling."""

    def __init__(self, config: EngineConfig, files: ModelFiles, model: InternVLForConditionalGeneration):
        self.config = config
        self.files = files
        self.sgp = SGPModel(model, config.prune_layer)
        self.model_id = config.model_id or files.model_id
        self.prune_layer = self.sgp.prune_layer
        self.max_context = files.max_context

    @classmethod
    def load(cls, config: EngineConfig) -> CloudEngine:
        """Load tokenizer, tiling and weights from ``config.model_dir`` (no hub access).

        Raises ``ValueError`` before touching the weights when the checkpoint's
        chat template cannot place the image (``check_chat_template``).
        """
        from ..shared.prompt import check_chat_template

        files = ModelFiles.load(config.model_dir)
        check_chat_template(files)
        model = InternVLForConditionalGeneration.from_pretrained(
            config.model_dir, dtype=DTYPES[config.dtype], attn_implementation="sdpa", local_files_only=True
        ).to(config.device)
        return cls(config, files, model)

    def answer(self, request: CloudRequest, should_stop: Callable[[], bool] | None = None) -> CloudReply:
        """Validate, run vision + pruned prefill + greedy decode, return the answer and its costs."""
        t0 = time.perf_counter()
        self._check_model_and_budget(request)
        image = decode_image(request.image, request.mime_type, max_pixels=self.config.max_image_pixels)
        pixel_values, layout = preprocess_image(image, self.files.tiling)
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

        features = self.sgp.image_features(torch.from_numpy(pixel_values))
        input_ids = torch.from_numpy(np.array(prompt.input_ids))  # a writable copy
        inputs_embeds = self.sgp.embed(input_ids, features)
        t_vision = time.perf_counter()
        keep_positions = kept_sequence_positions(
            len(input_ids), prompt.visual_start, layout.num_visual_tokens, torch.from_numpy(keep)
        )
        try:
            gen = self.sgp.generate(
                inputs_embeds, keep_positions, request.max_new_tokens, self.files.eos_token_ids, should_stop
            )
        except GenerationCancelled as exc:
            raise RequestError(grpc.StatusCode.CANCELLED, f"generation cancelled: {exc}") from exc
        return CloudReply(
            request_id=request.request_id,
            model=self.model_id,
            text=decode_answer(self.files, gen.token_ids),
            token_ids=tuple(gen.token_ids),
            prompt_tokens=gen.prompt_tokens,
            pruned_prompt_tokens=gen.pruned_prompt_tokens,
            num_visual_tokens=layout.num_visual_tokens,
            kept_visual_tokens=len(keep),
            prune_layer=self.prune_layer,
            timings=Timings(
                vision_ms=(t_vision - t0) * 1e3,
                prefill_ms=gen.prefill_ms,
                decode_ms=gen.decode_ms,
                total_ms=(time.perf_counter() - t0) * 1e3,
            ),
        )

    def _check_model_and_budget(self, request: CloudRequest) -> None:
        if request.model and request.model != self.model_id:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"unknown model {request.model!r}; this server serves {self.model_id!r}",
            )
        limit = self.config.max_new_tokens_limit
        if not 1 <= request.max_new_tokens <= limit:
            raise RequestError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"max_new_tokens must be in 1..{limit}, got {request.max_new_tokens}",
            )

    def _check_layout(self, request: CloudRequest, layout) -> None:
        if request.num_visual_tokens != layout.num_visual_tokens:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"num_visual_tokens {request.num_visual_tokens} does not match the "
                f"{layout.num_visual_tokens} the cloud computes for this image",
            )
        fingerprint = layout_fingerprint(layout, self.files.tiling)
        if request.layout != layout or request.layout_fingerprint != fingerprint:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"layout mismatch: the edge sent {_describe(request.layout)} "
                f"(fingerprint {request.layout_fingerprint:016x}), the cloud computes "
                f"{_describe(layout)} (fingerprint {fingerprint:016x}); edge and cloud must tile alike",
            )


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
