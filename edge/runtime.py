"""The small VLM on ONNX Runtime: greedy answers with their visual-token scores.

``EdgeModel.load(dir)`` opens an export directory (``stitch-export``'s output:
``stitch_edge.json``, ``vision.onnx``, ``decoder.onnx``, the token embedding
matrix and the checkpoint's tokenizer/config files) and ``generate`` answers
one question about one image:

    image -> tiles (shared.preprocess) -> vision.onnx -> image embeds
    prompt ids (shared.prompt) -> embedding rows, image embeds spliced in
    decoder.onnx prefill, then one decoder.onnx pass per new token (KV cache)

Every decoder pass also returns its visual-token score (summed inside the
graph, DESIGN "Visual-token score"); ``generate`` adds them up into ``A``.
The decoder computes logits only for the last ``num_logits`` positions:
generation asks for one row per pass, the consistency pass for one per answer
token, never for the whole prompt.
``teacher_forced_probs`` is the SEE consistency pass: the prompt with only some
visual tokens kept, original position ids, and the answer teacher-forced.

On CUDA (CUDAExecutionProvider) the KV cache stays on the device between
passes through IO binding; on CPU the same code keeps it in ORT's CPU memory.
The two decoder graphs (``sidecar.graph``) hold it differently: the explicit
graph returns a new, longer cache each pass (``list[OrtValue]``); the lean
graph (``lean_decoder``) writes into buffers of a fixed capacity that are both
its past input and its present output (``KVBuffers``), so a pass copies no
cache. ``generate`` sizes those buffers to the prompt and the token budget.

This module imports neither torch nor transformers (DESIGN invariant 5), and
does not gate or talk to the cloud: the SEE gate and the client SDK use it.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from stitchvlm.shared.layout import Layout, cap_max_tiles
from stitchvlm.shared.model_files import ModelFiles
from stitchvlm.shared.preprocess import decode_image, preprocess_image
from stitchvlm.shared.prompt import PromptIds, build_prompt, decode_answer

from .sidecar import EdgeSidecar

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class EdgeTimings:
    """Where one edge generation spent its time, in milliseconds."""

    preprocess_ms: float  # image decode + tiling + prompt ids
    vision_ms: float  # vision graph
    prefill_ms: float  # first decoder pass over the whole prompt
    decode_ms: float  # all later decoder passes together


@dataclass(frozen=True, eq=False)
class EdgeGeneration:
    """One greedy answer of the small model and what the gate and the cloud request need of it."""

    token_ids: tuple[int, ...]  # generated ids, the EOS included when one was generated
    text: str  # decoded answer without special tokens
    token_probs: np.ndarray  # [N_G] float64: softmax probability of each chosen token
    visual_scores: np.ndarray  # [|V|] float64: A = A^P + sum of A^D
    layout: Layout  # the tile grid of the image
    prompt: PromptIds  # prompt ids and where the visual tokens sit
    image_embeds: np.ndarray  # [|V|, hidden] export dtype: kept for the consistency pass
    timings: EdgeTimings


class _SharedStorage:
    """The lean graph's per-layer key and value buffers and how many positions they hold."""

    def __init__(self, values: list[ort.OrtValue]) -> None:
        self.values = values  # key_0, value_0, ... each [batch, kv_heads, capacity, head_dim]
        self.filled = 0  # positions written so far
        self._binding: tuple[ort.InferenceSession, ort.IOBinding] | None = None

    def binding(
        self, session: ort.InferenceSession, host_outputs: list[str], past_names, present_names
    ) -> ort.IOBinding:
        """An IOBinding of ``session`` with these buffers bound as past and present, made once per
        session: each pass rebinds only the inputs and ``host_outputs``, not 2 x layers buffers.
        ``host_outputs`` are bound first, so ``get_outputs()`` lists them first, in that order."""
        if self._binding is None or self._binding[0] is not session:
            binding = session.io_binding()
            for name in host_outputs:
                binding.bind_output(name, "cpu")
            for past_name, present_name, value in zip(past_names, present_names, self.values, strict=True):
                binding.bind_ortvalue_input(past_name, value)
                binding.bind_ortvalue_output(present_name, value)
            self._binding = (session, binding)
        return self._binding[1]


@dataclass(frozen=True, eq=False)
class KVBuffers:
    """The lean decoder's KV cache: the first ``length`` positions of shared, fixed-size buffers.

    A pass writes its new positions into the same buffers, so a cache can be
    extended once: decoding again from an older ``KVBuffers`` of the same
    buffers would overwrite what the newer one holds, and ``decode`` refuses it.
    """

    storage: _SharedStorage
    length: int  # positions filled: past of the next pass

    @classmethod
    def of(cls, values: list[ort.OrtValue], length: int = 0) -> KVBuffers:
        """Buffers (key_0, value_0, ... [batch, kv_heads, capacity, head_dim]) whose first ``length`` are filled."""
        storage = _SharedStorage(values)
        storage.filled = length
        return cls(storage, length)

    @property
    def capacity(self) -> int:
        return self.storage.values[0].shape()[2]

    @property
    def values(self) -> list[ort.OrtValue]:
        return self.storage.values


KVCache = list[ort.OrtValue] | KVBuffers


@dataclass(frozen=True, eq=False)
class DecoderStep:
    """What one decoder pass returns."""

    logits: np.ndarray  # [batch, num_logits, vocab] float32: the last num_logits positions
    visual_scores: np.ndarray  # [batch, past + seq] float32: this pass's score of every key position
    # present key/value per layer, on the session's device: list[OrtValue] (explicit graph) or
    # KVBuffers (lean graph); ``EdgeModel.cache_arrays`` reads either
    cache: KVCache


class EdgeModel:
    """The exported small VLM: vision graph, decoder graph, embeddings, tokenizer."""

    def __init__(
        self,
        sidecar: EdgeSidecar,
        files: ModelFiles,
        embeddings: np.ndarray,
        vision: ort.InferenceSession,
        decoder: ort.InferenceSession,
    ) -> None:
        self.sidecar = sidecar
        self.files = files
        self.embeddings = embeddings  # [vocab, hidden] export dtype (memory-mapped)
        self.vision = vision
        self.decoder = decoder
        # "cuda" when the decoder really runs on the CUDA EP (ORT falls back to CPU silently).
        self.device = "cuda" if decoder.get_providers()[0] == CUDA else "cpu"
        self.dtype = np.dtype(sidecar.numpy_dtype)
        self.shared_kv = sidecar.graph == "lean"  # KV in fixed buffers bound as past and present
        io, layers = sidecar.io, sidecar.dims.num_layers
        self._past_names = io.past_names(layers)
        self._present_names = io.present_names(layers)
        self._host_outputs = [io.logits, io.visual_scores]  # what each pass brings back to the host
        _check_graph_io(decoder, io.decoder_inputs(layers), io.decoder_outputs(layers), "decoder")
        _check_graph_io(vision, [io.pixel_values], [io.image_embeds], "vision")

    @classmethod
    def load(
        cls,
        edge_dir: str | Path,
        providers: list[str] | None = None,
        session_options: ort.SessionOptions | None = None,
        max_tiles: int | None = None,
    ) -> EdgeModel:
        """Open an export directory; CUDA when ORT can use it, else CPU, unless ``providers`` says.

        ``session_options`` (threads, graph optimisation level) apply to both graphs.
        ``max_tiles`` caps the grid tiles per image below the checkpoint's
        (``with_max_tiles``); the cloud must run with the same cap.
        A float32 lean export runs on the CPU (ORT's CUDA GroupQueryAttention is
        float16 only); asking for CUDA for one raises ``ValueError``.
        Raises ``FileNotFoundError``/``ValueError`` for a directory that is not a
        complete export, a ``--no-scores`` export, or one whose copied configs
        disagree with its sidecar.
        """
        root = Path(edge_dir)
        sidecar = EdgeSidecar.load(root)
        if not sidecar.with_scores:
            raise ValueError(
                f"{root} has no visual scores (stitch-export --no-scores, for benchmarks only); "
                "the edge runtime needs them: export again without --no-scores"
            )
        files = ModelFiles.load(root)
        _check_consistent(sidecar, files)
        embeddings = np.load(root / sidecar.graphs.embeddings, mmap_mode="r")
        dims = sidecar.dims
        if embeddings.shape != (dims.vocab_size, dims.hidden_size) or embeddings.dtype != sidecar.numpy_dtype:
            raise ValueError(
                f"{sidecar.graphs.embeddings} is {embeddings.dtype}{list(embeddings.shape)}, expected "
                f"{sidecar.numpy_dtype}[{dims.vocab_size}, {dims.hidden_size}]"
            )
        # ORT's CUDA GroupQueryAttention takes float16/bfloat16 only: a float32 lean graph on the
        # CUDA EP would run its attention on the CPU, where the shared buffers cannot be shared.
        cuda_capable = not (sidecar.graph == "lean" and sidecar.dtype == "fp32")
        if providers is None:
            cuda_available = CUDA in ort.get_available_providers()
            if cuda_available and not cuda_capable and _nvidia_device_present():
                warnings.warn(
                    f"{root} holds a float32 lean decoder, which the CUDA EP cannot run: running on the "
                    "CPU; export with --dtype fp16 to use the GPU",
                    stacklevel=2,
                )
            providers = [CUDA, CPU] if cuda_available and cuda_capable else [CPU]
        elif CUDA in providers and not cuda_capable:
            raise ValueError(
                f"{root} holds a float32 lean decoder, which the CUDA EP cannot run (its "
                "GroupQueryAttention is float16/bfloat16 only): export with --graph lean --dtype fp16"
            )
        decoder = open_decoder(root / sidecar.graphs.decoder, sidecar, session_options, providers)
        # The vision graph follows the providers the decoder really got (one CUDA probe, one warning).
        vision = ort.InferenceSession(
            str(root / sidecar.graphs.vision), sess_options=session_options, providers=decoder.get_providers()
        )
        return cls(sidecar, files, embeddings, vision, decoder).with_max_tiles(max_tiles)

    def with_max_tiles(self, max_tiles: int | None) -> EdgeModel:
        """This model with images cut into at most ``max_tiles`` grid tiles (plus the thumbnail).

        The cap applies to the exported checkpoint's tiling (``sidecar.tiling``),
        so it can lower ``max_tiles`` but never raise it: ``ValueError`` outside
        the checkpoint's ``min_tiles..max_tiles``. ``None`` keeps the current
        tiling. The returned model shares this one's sessions and embeddings;
        this one is not changed.
        """
        if max_tiles is None:
            return self
        tiling = cap_max_tiles(self.sidecar.tiling, max_tiles)
        if tiling == self.files.tiling:
            return self
        files = dataclasses.replace(self.files, tiling=tiling)
        return EdgeModel(self.sidecar, files, self.embeddings, self.vision, self.decoder)

    # ----------------------------------------------------------------- graph calls

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values [tiles, 3, t, t] float32 -> image embeds [tiles * tokens_per_tile, hidden]."""
        io = self.sidecar.io
        (embeds,) = self.vision.run(
            [io.image_embeds], {io.pixel_values: np.ascontiguousarray(pixel_values, np.float32)}
        )
        return embeds

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """Token ids [n] -> embedding rows [n, hidden] in the export dtype."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.sidecar.dims.vocab_size):
            raise ValueError(f"token ids outside the vocabulary 0..{self.sidecar.dims.vocab_size - 1}")
        return np.asarray(self.embeddings[ids])

    def empty_cache(self, batch: int = 1, capacity: int | None = None) -> KVCache:
        """A KV cache holding no positions: past length 0 for every layer.

        For the lean graph, buffers of ``capacity`` positions (default: the
        model's context); a pass needing more raises ``ValueError``. The
        explicit graph's cache grows by itself and ignores ``capacity``.
        """
        dims = self.sidecar.dims
        if not self.shared_kv:
            empty = np.zeros((batch, dims.num_kv_heads, 0, dims.head_dim), dtype=self.dtype)
            return [ort.OrtValue.ortvalue_from_numpy(empty, self.device, 0) for _ in self._past_names]
        capacity = self.files.max_context if capacity is None else int(capacity)
        shape = [batch, dims.num_kv_heads, capacity, dims.head_dim]
        # Nothing reads past the filled length: device buffers stay uninitialised, host ones are
        # np.zeros (calloc: pages are only touched when written).
        if self.device == "cpu":
            values = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.dtype)) for _ in self._past_names]
        else:
            values = [
                ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype.type, self.device, 0)
                for _ in self._past_names
            ]
        return KVBuffers.of(values)

    def cache_arrays(self, cache: KVCache) -> list[np.ndarray]:
        """key_0, value_0, ... of either cache kind as host arrays [batch, kv_heads, length, head_dim]."""
        if isinstance(cache, KVBuffers):
            return [value.numpy()[:, :, : cache.length] for value in cache.values]
        return [value.numpy() for value in cache]

    def decode(
        self,
        inputs_embeds: np.ndarray,
        position_ids: np.ndarray,
        score_query_mask: np.ndarray,
        cache: KVCache,
        attention_mask: np.ndarray | None = None,
        num_logits: int | None = None,
    ) -> DecoderStep:
        """One decoder pass over ``seq`` new positions after the ``past`` ones in ``cache``.

        inputs_embeds [batch, seq, hidden], position_ids [batch, seq] int64,
        score_query_mask [batch, seq] (1 = this query's attention counts in the
        score), attention_mask [batch, past + seq] int64 (all ones when None),
        num_logits: logits for the last n positions only, 1 <= n <= seq (all
        ``seq`` when None). The visual scores and the cache cover every position.
        ``cache`` comes from ``empty_cache`` or the previous pass's ``DecoderStep``;
        the lean graph takes no padding (its attention mask must be all ones).
        """
        io = self.sidecar.io
        batch, seq = position_ids.shape
        if self.shared_kv != isinstance(cache, KVBuffers):
            kind = "the KVBuffers of" if self.shared_kv else "the list of tensors of"
            raise ValueError(f"the {self.sidecar.graph} decoder takes {kind} empty_cache() or its last step")
        past = cache.length if isinstance(cache, KVBuffers) else cache[0].shape()[2]
        num_logits = seq if num_logits is None else int(num_logits)
        if not 1 <= num_logits <= seq:
            # the graph would gather wrapped-around rows for n > seq
            raise ValueError(f"num_logits must be in 1..{seq}, got {num_logits}")
        if attention_mask is None:
            attention_mask = np.ones((batch, past + seq), dtype=np.int64)
        elif self.shared_kv and not np.all(attention_mask == 1):
            # GroupQueryAttention reads the mask as one filled length per row (seqlens_k)
            raise ValueError("the lean decoder takes no padding: attention_mask must be all ones")
        if self.shared_kv and batch > 1 and not np.all(position_ids == position_ids[:1]):
            # its rotary caches are gathered at row 0's positions (lean_decoder.rotary_slots)
            raise ValueError("the lean decoder takes one set of positions: every batch row's position_ids must be equal")
        binding = (
            self._bind_shared_cache(cache, batch, past + seq) if self.shared_kv else self.decoder.io_binding()
        )
        binding.bind_cpu_input(io.inputs_embeds, np.ascontiguousarray(inputs_embeds, dtype=self.dtype))
        binding.bind_cpu_input(io.position_ids, np.ascontiguousarray(position_ids, dtype=np.int64))
        binding.bind_cpu_input(io.attention_mask, np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input(io.score_query_mask, np.ascontiguousarray(score_query_mask, dtype=np.float32))
        binding.bind_cpu_input(io.num_logits, np.array(num_logits, dtype=np.int64))
        # Logits and scores come back to the host every pass (bound before any present, so that
        # get_outputs() lists them first); the cache stays where the session runs.
        for name in self._host_outputs:
            binding.bind_output(name, "cpu")
        if not self.shared_kv:
            for name, value in zip(self._past_names, cache, strict=True):
                binding.bind_ortvalue_input(name, value)
            for name in self._present_names:
                binding.bind_output(name, self.device)
        self.decoder.run_with_iobinding(binding)
        logits, scores, *present = binding.get_outputs()
        if self.shared_kv:
            cache.storage.filled = past + seq
            present = KVBuffers(cache.storage, past + seq)
        return DecoderStep(logits=logits.numpy(), visual_scores=scores.numpy(), cache=present)

    def _bind_shared_cache(self, cache: KVBuffers, batch: int, total: int) -> ort.IOBinding:
        """The binding of ``cache``'s buffers as both past and present, once the pass to ``total``
        positions is known to fit and to extend the newest cache of those buffers."""
        if cache.storage.filled != cache.length:
            raise ValueError(
                f"this cache holds {cache.length} positions but its buffers were extended to "
                f"{cache.storage.filled} by a later pass; start from a new empty_cache()"
            )
        if total > cache.capacity or cache.values[0].shape()[0] != batch:
            raise ValueError(
                f"a pass to {total} positions of batch {batch} does not fit KV buffers of "
                f"{cache.capacity} positions, batch {cache.values[0].shape()[0]}"
            )
        return cache.storage.binding(self.decoder, self._host_outputs, self._past_names, self._present_names)

    # ----------------------------------------------------------------- generation

    def generate(
        self,
        image: Image.Image | bytes,
        question: str,
        max_new_tokens: int = 32,
        ignore_eos: bool = False,
    ) -> EdgeGeneration:
        """Greedy answer to ``question`` about ``image`` with per-token probabilities and scores A.

        Stops after an EOS id (kept in ``token_ids``) or ``max_new_tokens``
        tokens, or when the context is full. ``ignore_eos`` (benchmarks: a fixed
        number of tokens) keeps generating past EOS ids. Raises ``ValueError`` when the
        prompt alone does not fit the context, ``RequestError`` for image bytes
        that do not decode.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        started = time.perf_counter()
        picture = decode_image(image) if isinstance(image, bytes | bytearray) else image
        pixel_values, layout = preprocess_image(picture, self.files.tiling)
        prompt = build_prompt(self.files, question, layout.num_visual_tokens)
        prompt_len = len(prompt.input_ids)
        if prompt_len >= self.files.max_context:
            raise ValueError(
                f"prompt of {prompt_len} tokens does not fit the context of {self.files.max_context}"
            )
        budget = min(max_new_tokens, self.files.max_context - prompt_len)
        preprocessed = time.perf_counter()

        image_embeds = self.encode_image(pixel_values)  # [|V|, hidden]
        visioned = time.perf_counter()

        embeds = self.embed(prompt.input_ids)  # [S, hidden]
        embeds[prompt.visual_start : prompt.visual_end] = image_embeds
        # Prefill queries that count: the text after the image. Visual tokens and the text
        # before the image would add nothing anyway: causality keeps them from seeing any
        # visual token after them, and a visual token's own queries are not scored.
        query_mask = (np.arange(prompt_len) >= prompt.visual_end).astype(np.float32)  # [S]
        # The last token is never fed back, so prompt + budget positions always suffice.
        cache = self.empty_cache(capacity=prompt_len + budget)
        step = self.decode(embeds[None], np.arange(prompt_len)[None], query_mask[None], cache, num_logits=1)
        visual_scores = step.visual_scores[0, prompt.visual_start : prompt.visual_end].astype(np.float64)
        token, prob = _greedy(step.logits[0, -1])
        tokens, probs = [token], [prob]
        prefilled = time.perf_counter()

        eos = set() if ignore_eos else set(self.files.eos_token_ids)
        while tokens[-1] not in eos and len(tokens) < budget:
            position = prompt_len + len(tokens) - 1  # the fed token's position
            step = self.decode(
                self.embed(np.array([tokens[-1]]))[None],
                np.array([[position]]),
                np.ones((1, 1), dtype=np.float32),
                step.cache,
                num_logits=1,
            )
            visual_scores += step.visual_scores[0, prompt.visual_start : prompt.visual_end]
            token, prob = _greedy(step.logits[0, -1])
            tokens.append(token)
            probs.append(prob)
        finished = time.perf_counter()

        return EdgeGeneration(
            token_ids=tuple(tokens),
            text=decode_answer(self.files, tokens),
            token_probs=np.asarray(probs, dtype=np.float64),
            visual_scores=visual_scores,
            layout=layout,
            prompt=prompt,
            image_embeds=image_embeds,
            timings=EdgeTimings(
                preprocess_ms=1e3 * (preprocessed - started),
                vision_ms=1e3 * (visioned - preprocessed),
                prefill_ms=1e3 * (prefilled - visioned),
                decode_ms=1e3 * (finished - prefilled),
            ),
        )

    def teacher_forced_probs(
        self,
        prompt: PromptIds,
        image_embeds: np.ndarray,
        keep_visual: np.ndarray,
        answer_ids: np.ndarray | list[int] | tuple[int, ...],
    ) -> np.ndarray:
        """p'_i of each answer token with only ``keep_visual`` visual tokens in the prompt.

        One decoder pass over [text before the image, the kept visual tokens,
        text after, answer tokens but the last], every token at its ORIGINAL
        position id (DESIGN "SEE gate", S_cons). ``keep_visual`` holds ascending
        indices in 0..|V|-1 (``top_r_indices``); ``image_embeds`` [|V|, hidden]
        come from ``generate``, so vision does not run again. Returns [N] float64.
        """
        answer = np.asarray(answer_ids, dtype=np.int64).reshape(-1)  # [N]
        if answer.size == 0:
            return np.zeros(0, dtype=np.float64)
        kept = _kept_indices(keep_visual, prompt.num_visual_tokens)  # [k]
        if image_embeds.shape[0] != prompt.num_visual_tokens:
            raise ValueError(
                f"{image_embeds.shape[0]} image embeds for {prompt.num_visual_tokens} visual tokens"
            )
        ids = prompt.input_ids
        before = np.arange(prompt.visual_start)
        after = np.arange(prompt.visual_end, len(ids))
        answer_positions = len(ids) + np.arange(answer.size - 1)
        position_ids = np.concatenate([before, prompt.visual_start + kept, after, answer_positions])  # [S']
        embeds = np.concatenate(
            [
                self.embed(ids[: prompt.visual_start]),
                np.asarray(image_embeds, dtype=self.dtype)[kept],
                self.embed(ids[prompt.visual_end :]),
                self.embed(answer[:-1]),
            ]
        )  # [S', hidden]
        no_score = np.zeros((1, len(position_ids)), dtype=np.float32)  # the score of this pass is not used
        cache = self.empty_cache(capacity=len(position_ids))
        step = self.decode(embeds[None], position_ids[None], no_score, cache, num_logits=answer.size)
        # The last prompt position predicts answer[0], answer position j predicts answer[j + 1].
        logits = step.logits[0]  # [N, vocab]
        probs = _softmax64(logits)  # [N, vocab]
        return probs[np.arange(answer.size), answer]


def open_decoder(
    path: Path, sidecar: EdgeSidecar, options: ort.SessionOptions | None, providers: list[str]
) -> ort.InferenceSession:
    """The decoder session; a lean graph's runs its nodes in priority (file) order.

    ORT's default order may run each layer's score nodes only at the end of the
    pass, keeping every layer's query tensor alive until then (+0.3 GB in a
    1809-token Qwen2.5-0.5B prefill); the file order runs them right after
    their layer. ``options`` is left as it was given.
    """
    if sidecar.graph != "lean":
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    options = options or ort.SessionOptions()
    previous = options.execution_order
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    finally:
        options.execution_order = previous


def _nvidia_device_present() -> bool:
    """Whether this (Linux) machine has an NVIDIA GPU node: onnxruntime-gpu lists the CUDA EP on
    machines without one too, where a float32 lean export running on the CPU is no surprise."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


def _greedy(logits: np.ndarray) -> tuple[int, float]:
    """argmax token (lowest id among ties, as torch.argmax) and its float64 softmax probability."""
    # logits: [vocab]
    token = int(np.argmax(logits))
    # the one probability _softmax64 would give, without dividing the whole vocabulary (151k at Qwen2.5's)
    wide = logits.astype(np.float64)
    wide -= wide[token]  # the max: argmax's own logit
    return token, float(1.0 / np.exp(wide).sum())


def _softmax64(logits: np.ndarray) -> np.ndarray:
    # logits: [n, vocab] -> probabilities [n, vocab] float64
    wide = logits.astype(np.float64)
    wide -= wide.max(axis=-1, keepdims=True)
    exp = np.exp(wide)
    return exp / exp.sum(axis=-1, keepdims=True)


def _kept_indices(keep_visual: np.ndarray, num_visual_tokens: int) -> np.ndarray:
    """Ascending unique int64 indices in 0..|V|-1; a bool mask of length |V| is accepted too."""
    keep = np.asarray(keep_visual)
    if keep.dtype == np.bool_:
        if keep.shape != (num_visual_tokens,):
            raise ValueError(f"keep mask has shape {keep.shape}, expected ({num_visual_tokens},)")
        keep = np.flatnonzero(keep)
    keep = keep.astype(np.int64).reshape(-1)
    if keep.size == 0:
        raise ValueError("keep_visual is empty: at least one visual token must be kept")
    if keep[0] < 0 or keep[-1] >= num_visual_tokens or (np.diff(keep) <= 0).any():
        raise ValueError(f"keep_visual must be ascending unique indices in 0..{num_visual_tokens - 1}")
    return keep


def _check_graph_io(session: ort.InferenceSession, inputs: list[str], outputs: list[str], what: str) -> None:
    have_in = [i.name for i in session.get_inputs()]
    have_out = [o.name for o in session.get_outputs()]
    if have_in != inputs or have_out != outputs:
        raise ValueError(
            f"{what} graph I/O {have_in} -> {have_out} is not the sidecar's {inputs} -> {outputs}"
        )


def _check_consistent(sidecar: EdgeSidecar, files: ModelFiles) -> None:
    """The copied checkpoint files must still say what the export saw."""
    problems = []
    if files.tiling != sidecar.tiling:
        problems.append(f"tiling {files.tiling} != sidecar {sidecar.tiling}")
    if files.image_context_id != sidecar.tokens.image_token_id:
        problems.append(f"image token {files.image_context_id} != sidecar {sidecar.tokens.image_token_id}")
    if tuple(files.eos_token_ids) != tuple(sidecar.tokens.eos_token_ids):
        problems.append(f"eos ids {files.eos_token_ids} != sidecar {sidecar.tokens.eos_token_ids}")
    if files.num_hidden_layers != sidecar.dims.num_layers:
        problems.append(f"layers {files.num_hidden_layers} != sidecar {sidecar.dims.num_layers}")
    if problems:
        raise ValueError("export directory is inconsistent: " + "; ".join(problems))
