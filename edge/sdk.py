"""The edge SDK: ask a question, get the cascade's answer.

``Cascade.ask(image, prompt)`` runs the whole edge side of one request:

    image -> small VLM on ONNX Runtime (greedy answer, visual-token scores A)
          -> SEE gate (S_conf, S_cons, S)
          -> S >= tau, or no cloud: the edge's answer          (route "edge")
             S <  tau: the cloud's answer to a request carrying the ORIGINAL
                       image bytes, the prompt, the top-R indices of A, the
                       layout and its fingerprint                (route "cloud")
          -> the cloud failed: the edge's answer, ``degraded`` (or ``CloudError``)

``Cascade.ask_async`` / ``AsyncCascade.ask`` do the same awaitably: the ONNX
work on a worker thread, the cloud call through ``CloudClient.answer_async``.
``Cascade.stream`` / ``stream_async`` yield the answer as ``Chunk``s while the
cloud generates it (an edge answer is one chunk), the last one carrying the
``Result``.
``Cascade.stats()`` returns counters an application can show or export.

This module holds the routing rules and the request building; the model is
``runtime``'s, the gate ``gate``'s, the transport ``cloud_client``'s. No torch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stitchvlm.shared.errors import RequestError
from stitchvlm.shared.layout import layout_fingerprint
from stitchvlm.shared.preprocess import MIME_FORMATS, convert_to_rgb, decode_image
from stitchvlm.shared.scoring import GateDecision, top_r_indices
from stitchvlm.shared.types import CloudReply, CloudRequest

from .cloud_client import CloudClient, CloudError, WireSize, connect_cloud, is_grpc_address
from .gate import DEFAULT_CONSISTENCY_RETENTION, DEFAULT_TAU, GateConfig, see_gate
from .runtime import EdgeGeneration, EdgeModel

logger = logging.getLogger("stitchvlm.edge.sdk")

ROUTE_EDGE = "edge"
ROUTE_CLOUD = "cloud"
ON_FAILURE_DEGRADE = "degrade"  # answer locally, Result.degraded = True
ON_FAILURE_RAISE = "raise"  # raise the CloudError
_MIME_BY_FORMAT = {fmt: mime for mime, formats in MIME_FORMATS.items() for fmt in formats}

ImageInput = Image.Image | bytes | bytearray | str | Path


@dataclass(frozen=True)
class CascadeConfig:
    """How one ``Cascade`` routes and what it asks the cloud for."""

    tau: float = DEFAULT_TAU  # SEE threshold: S >= tau answers on the edge (0: always, > 1: never)
    retention: float = 0.09  # R: share of visual tokens the cloud keeps (top-R of the edge's scores)
    consistency_retention: float = DEFAULT_CONSISTENCY_RETENTION  # r_c of the gate's S_cons pass
    max_new_tokens: int = 32  # generation budget on the edge and in the cloud
    cloud_timeout_s: float = 10.0  # deadline of one cloud call, retries included
    on_cloud_failure: str = ON_FAILURE_DEGRADE  # "degrade" or "raise"
    cloud_model: str = ""  # model id the cloud should answer with; "" is the server's default
    # at most this many grid tiles per image (thumbnail not counted), below the checkpoint's max_tiles:
    # less vision work per image, fewer pixels seen; the cloud must run with the same cap. None: no cap
    max_tiles: int | None = None

    def __post_init__(self) -> None:
        GateConfig(self.tau, self.consistency_retention)  # the gate's own checks
        if not 0.0 < float(self.retention) <= 1.0:  # also false for NaN
            raise ValueError(f"retention must be in (0, 1], got {self.retention}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not float(self.cloud_timeout_s) > 0:
            raise ValueError(f"cloud_timeout_s must be > 0, got {self.cloud_timeout_s}")
        if self.on_cloud_failure not in (ON_FAILURE_DEGRADE, ON_FAILURE_RAISE):
            raise ValueError(f"on_cloud_failure must be 'degrade' or 'raise', got {self.on_cloud_failure!r}")
        if self.max_tiles is not None and (isinstance(self.max_tiles, bool) or self.max_tiles < 1):
            raise ValueError(f"max_tiles must be >= 1 or None, got {self.max_tiles!r}")

    @property
    def gate(self) -> GateConfig:
        return GateConfig(tau=self.tau, consistency_retention=self.consistency_retention)


@dataclass(frozen=True, eq=False)
class Result:
    """The cascade's answer to one question and how it came about."""

    answer: str  # what the application shows: the cloud's text when it answered, else the edge's
    route: str  # "edge" or "cloud": which model's answer ``answer`` is
    s_conf: float  # S_conf of the edge's answer
    s_cons: float  # S_cons of the edge's answer
    s: float  # (S_conf + S_cons) / 2, compared with tau
    tau: float  # the threshold used
    kept_indices: np.ndarray  # [k] int64: top-R visual tokens by the edge's scores (sent when escalated)
    num_visual_tokens: int  # |V| of the image
    edge_answer: str  # the small model's answer, whatever the route
    edge_token_ids: tuple[int, ...]  # its generated ids, EOS included when generated
    token_probs: np.ndarray  # [N_G] float64: p_i of each edge token
    visual_scores: np.ndarray  # [|V|] float64: the edge's visual-token scores A
    cloud_reply: CloudReply | None  # the cloud's reply when it answered
    bytes_sent: int  # serialized request size when the cloud was called, else 0
    wire: WireSize | None  # that size split into image / indices / other; None when not called
    timings: dict[str, float]  # ms: edge_ms (image decode + generate), gate_ms, cloud_ms, total_ms
    degraded: bool  # the cloud was asked and failed; ``answer`` is the edge's
    error: str | None  # the cloud's failure ("UNAVAILABLE: ...") when degraded
    request_id: str  # id of the cloud request ("" when the cloud was not called)


@dataclass(frozen=True, eq=False)
class Chunk:
    """A piece of a streamed answer. The texts of all chunks concatenated are ``Result.answer``."""

    text: str  # new text (the whole answer when it comes from the edge)
    token_ids: tuple[int, ...]  # the ids behind ``text`` (the answering model's vocabulary)
    route: str  # "edge" or "cloud": which model this text is from
    result: Result | None = None  # on the last chunk: everything ``ask`` would have returned


@dataclass(frozen=True)
class CascadeStats:
    """Counters since the ``Cascade`` was made.

    ``asked = exited_on_edge + no_cloud + escalated`` and
    ``escalated = cloud_answered + degraded + failed``. Questions refused before
    the gate (an unreadable image, a prompt that does not fit) are not counted.
    """

    asked: int = 0  # questions that reached the gate
    exited_on_edge: int = 0  # S >= tau: answered on the edge
    no_cloud: int = 0  # S < tau but no cloud configured: answered on the edge, not degraded
    escalated: int = 0  # S < tau: the cloud was called
    cloud_answered: int = 0  # escalations the cloud answered
    degraded: int = 0  # escalations that failed and got the edge's answer
    failed: int = 0  # escalations that failed and raised CloudError (on_cloud_failure="raise")
    bytes_sent: int = 0  # serialized request bytes of all escalations


@dataclass(frozen=True, eq=False)
class _EdgeOutcome:
    """Everything ``ask`` knows before it (maybe) calls the cloud."""

    gen: EdgeGeneration
    decision: GateDecision
    kept: np.ndarray  # [k] int64 top-R indices
    request: CloudRequest | None  # built only when escalating
    edge_ms: float
    gate_ms: float
    started: float  # time.perf_counter() at the start of ask


@dataclass(frozen=True)
class _Image:
    """The caller's image as the edge uses it and as the cloud will get it."""

    picture: Image.Image  # RGB, what the small model sees
    data: bytes  # encoded bytes for the request: the caller's own, or PNG of a PIL image
    mime_type: str


class Cascade:
    """Small VLM on the edge, large VLM in the cloud, the SEE gate between them. Thread-safe."""

    def __init__(
        self,
        model: EdgeModel | str | Path,
        cloud: CloudClient | str | list[str] | object | None = None,
        config: CascadeConfig | None = None,
        *,
        providers: list[str] | None = None,
        **options: object,
    ) -> None:
        """``model``: an ``EdgeModel`` or an export directory (loaded with ``providers``).
        ``cloud``: None (edge only), "host:port" (gRPC), replicas to balance over (a list of
        "host:port", "a:1,b:2" or "dns:///name:port"), a ``CloudClient`` or an engine
        (see ``connect_cloud``). ``options``: ``CascadeConfig`` fields overriding ``config``
        (``tau=0.3``, ``retention=0.35``, ...)."""
        self.config = dataclasses.replace(config or CascadeConfig(), **options)
        loaded = model if isinstance(model, EdgeModel) else EdgeModel.load(model, providers=providers)
        self.model = loaded.with_max_tiles(self.config.max_tiles)  # ValueError above the checkpoint's
        self._owns_client = is_grpc_address(cloud)
        self.cloud = connect_cloud(cloud)
        self._tiling = self.model.files.tiling
        self._tiling_confirmed = False  # the cloud said it tiles like this edge (check_cloud_tiling)
        self._lock = threading.Lock()
        self._stats = CascadeStats()

    # ----------------------------------------------------------------- public

    def ask(self, image: ImageInput, prompt: str) -> Result:
        """The cascade's answer to ``prompt`` about ``image`` (PIL image, encoded bytes or a path).

        Raises ``ValueError`` for an unreadable image or a prompt the model
        cannot take, ``FileNotFoundError`` for a missing path, and
        ``CloudError`` when the cloud fails and ``on_cloud_failure`` is "raise".
        """
        edge = self._run_edge(image, prompt)
        if edge.request is None:
            return self._finish(edge, None, None, 0.0)
        t0 = time.perf_counter()
        try:
            self._check_cloud_tiling()
            reply, error = self.cloud.answer(edge.request, self.config.cloud_timeout_s), None
        except CloudError as failure:
            reply, error = None, failure
        return self._finish(edge, reply, error, 1e3 * (time.perf_counter() - t0))

    async def ask_async(self, image: ImageInput, prompt: str) -> Result:
        """``ask`` as a coroutine: the ONNX work on a worker thread, the cloud call awaited."""
        edge = await asyncio.to_thread(self._run_edge, image, prompt)
        if edge.request is None:
            return self._finish(edge, None, None, 0.0)
        t0 = time.perf_counter()
        try:
            if not self._tiling_confirmed:
                await asyncio.to_thread(self._check_cloud_tiling)
            reply, error = await self.cloud.answer_async(edge.request, self.config.cloud_timeout_s), None
        except CloudError as failure:
            reply, error = None, failure
        return self._finish(edge, reply, error, 1e3 * (time.perf_counter() - t0))

    def stream(self, image: ImageInput, prompt: str) -> Iterator[Chunk]:
        """``ask``, with the cloud's answer yielded as it is generated.

        An edge answer (or a degraded one, when the cloud fails before its
        first chunk) arrives as one chunk. A cloud failure after text has been
        yielded raises ``CloudError`` whatever ``on_cloud_failure`` says: the
        caller has shown part of the cloud's answer and must not get the
        edge's appended to it.
        """
        edge = self._run_edge(image, prompt)
        if edge.request is None:
            yield self._last_chunk(self._finish(edge, None, None, 0.0), local=True)
            return
        t0 = time.perf_counter()
        reply, error, streamed = None, None, False
        try:
            self._check_cloud_tiling()
            for piece in self.cloud.stream(edge.request, self.config.cloud_timeout_s):
                if piece.reply is not None:
                    reply = piece.reply
                    break
                streamed = True
                yield Chunk(piece.text, piece.token_ids, ROUTE_CLOUD)
        except CloudError as failure:
            error = failure
        yield self._stream_end(edge, reply, error, streamed, t0)

    async def stream_async(self, image: ImageInput, prompt: str) -> AsyncIterator[Chunk]:
        """``stream`` as an async generator: the ONNX work on a worker thread, the cloud stream awaited."""
        edge = await asyncio.to_thread(self._run_edge, image, prompt)
        if edge.request is None:
            yield self._last_chunk(self._finish(edge, None, None, 0.0), local=True)
            return
        t0 = time.perf_counter()
        reply, error, streamed = None, None, False
        try:
            if not self._tiling_confirmed:
                await asyncio.to_thread(self._check_cloud_tiling)
            async for piece in self.cloud.stream_async(edge.request, self.config.cloud_timeout_s):
                if piece.reply is not None:
                    reply = piece.reply
                    break
                streamed = True
                yield Chunk(piece.text, piece.token_ids, ROUTE_CLOUD)
        except CloudError as failure:
            error = failure
        yield self._stream_end(edge, reply, error, streamed, t0)

    def _stream_end(
        self,
        edge: _EdgeOutcome,
        reply: CloudReply | None,
        error: CloudError | None,
        streamed: bool,
        t0: float,
    ) -> Chunk:
        """The last chunk of a cloud stream; raises a failure that came after text was yielded."""
        cloud_ms = 1e3 * (time.perf_counter() - t0)
        result = self._finish(edge, reply, error, cloud_ms, force_raise=error is not None and streamed)
        return self._last_chunk(result, local=reply is None)

    @staticmethod
    def _last_chunk(result: Result, local: bool) -> Chunk:
        """The closing chunk: the edge's whole answer when it answered, else nothing new."""
        if local:
            return Chunk(result.answer, result.edge_token_ids, ROUTE_EDGE, result)
        return Chunk("", (), ROUTE_CLOUD, result)

    def stats(self) -> CascadeStats:
        """A snapshot of the counters."""
        with self._lock:
            return self._stats

    def close(self) -> None:
        """Close the cloud client when this ``Cascade`` made it from an address."""
        if self._owns_client and self.cloud is not None:
            self.cloud.close()

    def __enter__(self) -> Cascade:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- steps

    def _check_cloud_tiling(self) -> None:
        """Before the first escalation: ``CloudError(FAILED_PRECONDITION)`` when the cloud tiles otherwise.

        A cloud run with another ``--max-tiles`` (or another checkpoint tiling)
        would refuse every request's layout; this says why in one message naming
        both ``max_tiles``. Asked once per ``Cascade`` after a match; a cloud
        that cannot tell (no ``GetModelInfo``, not reachable yet) is not held
        against the request, whose layout the cloud checks anyway.
        """
        if self._tiling_confirmed:
            return
        if self.cloud.check_tiling(self._tiling, self.config.cloud_timeout_s):
            self._tiling_confirmed = True

    def _run_edge(self, image: ImageInput, prompt: str) -> _EdgeOutcome:
        """Generate, gate, pick the top-R tokens and build the cloud request when escalating."""
        started = time.perf_counter()
        source = load_image(image)
        gen = self.model.generate(source.picture, prompt, self.config.max_new_tokens)
        generated = time.perf_counter()
        decision = see_gate(self.model, gen, self.config.gate)
        gated = time.perf_counter()
        kept = top_r_indices(gen.visual_scores, self.config.retention)  # [k]
        escalate = not decision.exit_on_edge and self.cloud is not None
        request = self._request(source, prompt, gen, kept) if escalate else None
        return _EdgeOutcome(
            gen=gen,
            decision=decision,
            kept=kept,
            request=request,
            edge_ms=1e3 * (generated - started),
            gate_ms=1e3 * (gated - generated),
            started=started,
        )

    def _request(self, source: _Image, prompt: str, gen: EdgeGeneration, kept: np.ndarray) -> CloudRequest:
        return CloudRequest(
            image=source.data,
            mime_type=source.mime_type,
            prompt=prompt,
            kept_indices=kept,
            num_visual_tokens=gen.layout.num_visual_tokens,
            retention=self.config.retention,
            layout=gen.layout,
            layout_fingerprint=layout_fingerprint(gen.layout, self._tiling),
            max_new_tokens=self.config.max_new_tokens,
            request_id=uuid.uuid4().hex,
            model=self.config.cloud_model,
        )

    def _finish(
        self,
        edge: _EdgeOutcome,
        reply: CloudReply | None,
        error: CloudError | None,
        cloud_ms: float,
        force_raise: bool = False,
    ) -> Result:
        """Count, then build the Result (or raise the cloud's error in "raise" mode or ``force_raise``)."""
        request = edge.request
        wire = self.cloud.wire_size(request) if request is not None else None
        degraded = (
            error is not None and self.config.on_cloud_failure == ON_FAILURE_DEGRADE and not force_raise
        )
        self._count(edge, reply, error, wire, degraded)
        _log_result(edge, reply, error, wire, 1e3 * (time.perf_counter() - edge.started))
        if error is not None and not degraded:
            raise error
        gen, decision = edge.gen, edge.decision
        return Result(
            answer=reply.text if reply is not None else gen.text,
            route=ROUTE_CLOUD if reply is not None else ROUTE_EDGE,
            s_conf=decision.s_conf,
            s_cons=decision.s_cons,
            s=decision.s,
            tau=decision.tau,
            kept_indices=edge.kept,
            num_visual_tokens=gen.layout.num_visual_tokens,
            edge_answer=gen.text,
            edge_token_ids=gen.token_ids,
            token_probs=gen.token_probs,
            visual_scores=gen.visual_scores,
            cloud_reply=reply,
            bytes_sent=wire.total if wire is not None else 0,
            wire=wire,
            timings={
                "edge_ms": edge.edge_ms,
                "gate_ms": edge.gate_ms,
                "cloud_ms": cloud_ms,
                "total_ms": 1e3 * (time.perf_counter() - edge.started),
            },
            degraded=degraded,
            error=str(error) if error is not None else None,
            request_id=request.request_id if request is not None else "",
        )

    def _count(
        self,
        edge: _EdgeOutcome,
        reply: CloudReply | None,
        error: CloudError | None,
        wire: WireSize | None,
        degraded: bool,
    ) -> None:
        bump = {"asked": 1}
        if edge.decision.exit_on_edge:
            bump["exited_on_edge"] = 1
        elif edge.request is None:
            bump["no_cloud"] = 1
        else:
            bump["escalated"] = 1
            bump["bytes_sent"] = wire.total
            if reply is not None:
                bump["cloud_answered"] = 1
            else:
                bump["degraded" if degraded else "failed"] = 1
        with self._lock:
            s = self._stats
            self._stats = dataclasses.replace(s, **{name: getattr(s, name) + n for name, n in bump.items()})


def _log_result(
    edge: _EdgeOutcome,
    reply: CloudReply | None,
    error: CloudError | None,
    wire: WireSize | None,
    total_ms: float,
) -> None:
    """One key=value line per question, keyed by the request id the server logs ("-": not escalated)."""
    request = edge.request
    fields: dict[str, object] = {
        "id": request.request_id if request is not None else "-",
        "route": ROUTE_CLOUD if reply is not None else ROUTE_EDGE,
        "status": "OK" if error is None else error.code.name,
        "s": f"{edge.decision.s:.4f}",
        "tau": f"{edge.decision.tau:g}",
    }
    if wire is not None:
        fields.update(request_bytes=wire.total, image_bytes=wire.image, index_bytes=wire.indices)
    fields.update(edge_ms=round(edge.edge_ms, 1), total_ms=round(total_ms, 1))
    if error is not None:
        fields["message"] = json.dumps(error.message)
    logger.log(
        logging.WARNING if error is not None else logging.INFO,
        "request %s",
        " ".join(f"{k}={v}" for k, v in fields.items()),
    )


class AsyncCascade:
    """``Cascade`` for asyncio code: ``await cascade.ask(image, prompt)``; same arguments."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.cascade = Cascade(*args, **kwargs)  # loads the model here, blocking

    async def ask(self, image: ImageInput, prompt: str) -> Result:
        return await self.cascade.ask_async(image, prompt)

    def stream(self, image: ImageInput, prompt: str) -> AsyncIterator[Chunk]:
        """``async for chunk in cascade.stream(image, prompt)``: see ``Cascade.stream``."""
        return self.cascade.stream_async(image, prompt)

    def stats(self) -> CascadeStats:
        return self.cascade.stats()

    async def close(self) -> None:
        self.cascade.close()

    async def __aenter__(self) -> AsyncCascade:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# ----------------------------------------------------------------------------- images


def load_image(image: ImageInput) -> _Image:
    """The caller's image for the edge (RGB) and the cloud (bytes as given, or PNG).

    Bytes and files are decoded with ``shared.preprocess.decode_image``, the
    cloud's own decoder, so both sides see the same pixels (EXIF rotation,
    transparency on white). A PIL image is taken as it is, converted to RGB
    and sent as PNG, which decodes to exactly those pixels.
    """
    if isinstance(image, Image.Image):
        rgb = convert_to_rgb(image)
        buffer = io.BytesIO()
        rgb.save(buffer, format="PNG")
        return _Image(picture=rgb, data=buffer.getvalue(), mime_type="image/png")
    if isinstance(image, str | Path):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} does not exist")
        data = path.read_bytes()
    elif isinstance(image, bytes | bytearray):
        data = bytes(image)
    else:
        raise TypeError(f"image must be a PIL image, bytes or a path, got {type(image).__name__}")
    try:
        picture = decode_image(data)
        with Image.open(io.BytesIO(data)) as header:  # header only: which format to declare
            mime_type = _MIME_BY_FORMAT.get(header.format or "", "")
    except RequestError as error:
        raise ValueError(f"unreadable image: {error.message}") from error
    return _Image(picture=picture, data=data, mime_type=mime_type)
