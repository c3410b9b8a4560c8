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
    __slots__ = ("max_new_tokens",)
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    def __init__(self, max_new_tokens: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("queue_ms", "vision_ms", "prefill_ms", "decode_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    VISION_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    vision_ms: float
    prefill_ms: float
    decode_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., vision_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class AnswerReply(_message.Message):
    __slots__ = ("request_id", "model", "text", "token_ids", "prompt_tokens", "pruned_prompt_tokens", "num_visual_tokens", "kept_visual_tokens", "prune_layer", "timings")
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
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., prompt_tokens: _Optional[int] = ..., pruned_prompt_tokens: _Optional[int] = ..., num_visual_tokens: _Optional[int] = ..., kept_visual_tokens: _Optional[int] = ..., prune_layer: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...
