from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Layout(_message.Message):
    __slots__ = ("tile_size", "grid_columns", "grid_rows", "thumbnail", "tokens_per_tile", "fingerprint")
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRID_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    GRID_ROWS_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_TILE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    tile_size: int
    grid_columns: int
    grid_rows: int
    thumbnail: bool
    tokens_per_tile: int
    fingerprint: int
    def __init__(self, tile_size: _Optional[int] = ..., grid_columns: _Optional[int] = ..., grid_rows: _Optional[int] = ..., thumbnail: _Optional[bool] = ..., tokens_per_tile: _Optional[int] = ..., fingerprint: _Optional[int] = ...) -> None: ...

class KeptTokens(_message.Message):
    __slots__ = ("encoding", "data", "count", "indices")
    class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ENCODING_UNSPECIFIED: _ClassVar[KeptTokens.Encoding]
        BITMAP: _ClassVar[KeptTokens.Encoding]
        DELTA_VARINT: _ClassVar[KeptTokens.Encoding]
        PLAIN: _ClassVar[KeptTokens.Encoding]
    ENCODING_UNSPECIFIED: KeptTokens.Encoding
    BITMAP: KeptTokens.Encoding
    DELTA_VARINT: KeptTokens.Encoding
    PLAIN: KeptTokens.Encoding
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    encoding: KeptTokens.Encoding
    data: bytes
    count: int
    indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, encoding: _Optional[_Union[KeptTokens.Encoding, str]] = ..., data: _Optional[bytes] = ..., count: _Optional[int] = ..., indices: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerationParams(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class AnswerRequest(_message.Message):
    __slots__ = ("request_id", "model", "image", "image_mime_type", "prompt", "num_visual_tokens", "retention", "kept", "layout", "generation")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_VISUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    image: bytes
    image_mime_type: str
    prompt: str
    num_visual_tokens: int
    retention: float
    kept: KeptTokens
    layout: Layout
    generation: GenerationParams
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., image: _Optional[bytes] = ..., image_mime_type: _Optional[str] = ..., prompt: _Optional[str] = ..., num_visual_tokens: _Optional[int] = ..., retention: _Optional[float] = ..., kept: _Optional[_Union[KeptTokens, _Mapping]] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ..., generation: _Optional[_Union[GenerationParams, _Mapping]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "vision_ms", "prefill_ms", "decode_ms", "total_ms", "first_token_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    VISION_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    vision_ms: float
    prefill_ms: float
    decode_ms: float
    total_ms: float
    first_token_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., vision_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., first_token_ms: _Optional[float] = ...) -> None: ...

class AnswerReply(_message.Message):
    __slots__ = ("request_id", "model", "text", "token_ids", "prompt_tokens", "pruned_prompt_tokens", "num_visual_tokens", "kept_visual_tokens", "prune_layer", "timings", "finish_reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRUNED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_VISUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEPT_VISUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRUNE_LAYER_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_tokens: int
    pruned_prompt_tokens: int
    num_visual_tokens: int
    kept_visual_tokens: int
    prune_layer: int
    timings: Timings
    finish_reason: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., prompt_tokens: _Optional[int] = ..., pruned_prompt_tokens: _Optional[int] = ..., num_visual_tokens: _Optional[int] = ..., kept_visual_tokens: _Optional[int] = ..., prune_layer: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class AnswerChunk(_message.Message):
    __slots__ = ("delta", "final")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    delta: TextDelta
    final: AnswerReply
    def __init__(self, delta: _Optional[_Union[TextDelta, _Mapping]] = ..., final: _Optional[_Union[AnswerReply, _Mapping]] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("models", "tiling", "prune_layer", "num_layers", "max_new_tokens", "max_image_pixels", "max_message_bytes", "max_context", "index_encodings", "image_mime_types", "max_batch_size")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    TILING_FIELD_NUMBER: _ClassVar[int]
    PRUNE_LAYER_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    INDEX_ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_MIME_TYPES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    tiling: Tiling
    prune_layer: int
    num_layers: int
    max_new_tokens: int
    max_image_pixels: int
    max_message_bytes: int
    max_context: int
    index_encodings: _containers.RepeatedScalarFieldContainer[KeptTokens.Encoding]
    image_mime_types: _containers.RepeatedScalarFieldContainer[str]
    max_batch_size: int
    def __init__(self, models: _Optional[_Iterable[str]] = ..., tiling: _Optional[_Union[Tiling, _Mapping]] = ..., prune_layer: _Optional[int] = ..., num_layers: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_context: _Optional[int] = ..., index_encodings: _Optional[_Iterable[_Union[KeptTokens.Encoding, str]]] = ..., image_mime_types: _Optional[_Iterable[str]] = ..., max_batch_size: _Optional[int] = ...) -> None: ...

class Tiling(_message.Message):
    __slots__ = ("tile_size", "min_tiles", "max_tiles", "thumbnail", "tokens_per_tile", "image_mean", "image_std")
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_TILES_FIELD_NUMBER: _ClassVar[int]
    MAX_TILES_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_TILE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_MEAN_FIELD_NUMBER: _ClassVar[int]
    IMAGE_STD_FIELD_NUMBER: _ClassVar[int]
    tile_size: int
    min_tiles: int
    max_tiles: int
    thumbnail: bool
    tokens_per_tile: int
    image_mean: _containers.RepeatedScalarFieldContainer[float]
    image_std: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, tile_size: _Optional[int] = ..., min_tiles: _Optional[int] = ..., max_tiles: _Optional[int] = ..., thumbnail: _Optional[bool] = ..., tokens_per_tile: _Optional[int] = ..., image_mean: _Optional[_Iterable[float]] = ..., image_std: _Optional[_Iterable[float]] = ...) -> None: ...
