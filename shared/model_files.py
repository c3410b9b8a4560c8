"""Read what a Hugging Face InternVL checkpoint directory says, without torch or transformers.

The edge runs without torch (DESIGN invariant 5) but still needs the
checkpoint's tokenizer, chat template, tiling and special token ids. This
module reads them from the published files (``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja`` / ``chat_template.json``,
``config.json``, ``generation_config.json``, ``preprocessor_config.json``,
``processor_config.json``) with json and ``tokenizers`` only.

It does not load weights, build prompts (``prompt``) or cut images
(``preprocess``); it only says what the files say, and refuses a directory
that lacks a file or key it needs with an error naming it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from .layout import TilingConfig, cap_max_tiles
from .preprocess import tiling_config_from_files

# Named special tokens a transformers tokenizer exposes to chat templates (bos_token, ...).
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# The InternVL image tokens, by the names InternVLProcessor reads from the tokenizer.
IMAGE_TOKEN_NAMES = ("start_image_token", "end_image_token", "context_image_token")
# Other names checkpoints give an image token: some tokenizer configs call the context token
# "image_token" (the name most transformers processors read), as transformers' own
# tokenizer.image_token alias does.
IMAGE_TOKEN_ALIASES = {"context_image_token": ("image_token",)}


@dataclass(frozen=True, eq=False)
class ModelFiles:
    """Everything the edge needs from one checkpoint directory, except the weights."""

    path: Path  # the checkpoint directory
    model_id: str  # the directory name
    tokenizer: Tokenizer  # tokenizer.json as the `tokenizers` library loads it
    chat_template: str  # the Jinja chat template source
    special_tokens: dict[str, str]  # named special tokens (bos_token, eos_token, ...) the template may use
    tiling: TilingConfig  # how images are cut into tiles and how many tokens a tile makes
    image_start_id: int  # id of <img>
    image_end_id: int  # id of </img>
    image_context_id: int  # id of <IMG_CONTEXT>, one per visual token (config.json image_token_id)
    eos_token_ids: tuple[int, ...]  # generation stops on any of these
    pad_token_id: int | None  # padding id, if the checkpoint names one
    max_context: int  # text model max_position_embeddings
    num_hidden_layers: int  # decoder layers of the text model
    num_attention_heads: int  # query heads of the text model
    num_key_value_heads: int  # key/value heads of the text model
    special_token_ids: frozenset[int]  # ids decode(skip_special_tokens=True) drops
    # Strings a chat template may write for "one image here": the context token, then the
    # tokenizer config's "image_token" when that names another string (e.g. "<image>").
    image_placeholders: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.image_placeholders:
            object.__setattr__(self, "image_placeholders", (self.image_context_token,))

    @property
    def image_start_token(self) -> str:
        return self.tokenizer.id_to_token(self.image_start_id)

    @property
    def image_end_token(self) -> str:
        return self.tokenizer.id_to_token(self.image_end_id)

    @property
    def image_context_token(self) -> str:
        return self.tokenizer.id_to_token(self.image_context_id)

    def with_max_tiles(self, max_tiles: int | None) -> ModelFiles:
        """These files with the tiling capped at ``max_tiles`` grid tiles (``layout.cap_max_tiles``).

        ``None`` returns ``self``; a new ``ModelFiles`` otherwise (the loaded one is not changed).
        """
        if max_tiles is None:
            return self
        return dataclasses.replace(self, tiling=cap_max_tiles(self.tiling, max_tiles))

    @classmethod
    def load(cls, path: str | Path) -> ModelFiles:
        """Read a checkpoint directory; ``FileNotFoundError`` / ``ValueError`` name what is missing or wrong."""
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"checkpoint directory {root} does not exist")
        config = _read_json(root, "config.json")
        tokenizer_config = _read_json(root, "tokenizer_config.json")
        tokenizer = Tokenizer.from_file(str(_require(root, "tokenizer.json")))
        text_config = _section(config, "text_config", "config.json")

        image_ids = {
            name: _token_id(tokenizer, _image_token(tokenizer_config, name)) for name in IMAGE_TOKEN_NAMES
        }
        image_token_id = _key(config, "image_token_id", "config.json")
        if image_token_id != image_ids["context_image_token"]:
            raise ValueError(
                f"config.json image_token_id {image_token_id} is not the tokenizer's context image token "
                f"id {image_ids['context_image_token']}"
            )
        special_tokens = _named_special_tokens(tokenizer_config)
        eos_ids, pad_id = _generation_ids(root, text_config, tokenizer, special_tokens)
        num_heads = int(_key(text_config, "num_attention_heads", "config.json text_config"))
        return cls(
            path=root,
            model_id=root.resolve().name,
            tokenizer=tokenizer,
            chat_template=_chat_template(root, tokenizer_config),
            special_tokens=special_tokens,
            tiling=_tiling(root, config),
            image_start_id=image_ids["start_image_token"],
            image_end_id=image_ids["end_image_token"],
            image_context_id=image_ids["context_image_token"],
            eos_token_ids=eos_ids,
            pad_token_id=pad_id,
            max_context=int(_key(text_config, "max_position_embeddings", "config.json text_config")),
            num_hidden_layers=int(_key(text_config, "num_hidden_layers", "config.json text_config")),
            num_attention_heads=num_heads,
            num_key_value_heads=int(text_config.get("num_key_value_heads") or num_heads),
            special_token_ids=_special_token_ids(tokenizer),
            image_placeholders=_image_placeholders(
                tokenizer, tokenizer_config, image_ids["context_image_token"]
            ),
        )


def _require(root: Path, name: str) -> Path:
    file = root / name
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {root} has no {name}")
    return file


def _read_json(root: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads(_require(root, name).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{root / name} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{root / name} must hold a JSON object")
    return data


def _key(data: dict[str, Any], key: str, where: str) -> Any:
    if data.get(key) is None:
        raise ValueError(f"{where} has no {key!r}")
    return data[key]


def _section(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    section = _key(data, key, where)
    if not isinstance(section, dict):
        raise ValueError(f"{where} {key!r} must be an object")
    return section


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _image_token(tokenizer_config: dict[str, Any], name: str) -> str:
    # transformers 4.5x writes {"extra_special_tokens": {name: token}}, 5.x writes name: token at top level.
    for key in (name, *IMAGE_TOKEN_ALIASES.get(name, ())):
        if token := _named_token(tokenizer_config, key):
            return token
    raise ValueError(f"tokenizer_config.json does not name {name!r} (InternVL's image tokens)")


def _named_token(tokenizer_config: dict[str, Any], name: str) -> str | None:
    extra = tokenizer_config.get("extra_special_tokens")
    specific = tokenizer_config.get("model_specific_special_tokens")
    for source in (extra, specific, tokenizer_config):
        if isinstance(source, dict) and (token := _token_content(source.get(name))):
            return token
    return None


def _image_placeholders(
    tokenizer: Tokenizer, tokenizer_config: dict[str, Any], context_id: int
) -> tuple[str, ...]:
    context = tokenizer.id_to_token(context_id)
    alias = _named_token(tokenizer_config, "image_token")
    return (context,) if alias in (None, context) else (context, alias)


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"tokenizer.json has no token {token!r}")
    return token_id


def _named_special_tokens(tokenizer_config: dict[str, Any]) -> dict[str, str]:
    named = {key: _token_content(tokenizer_config.get(key)) for key in NAMED_SPECIAL_TOKENS}
    return {key: token for key, token in named.items() if token is not None}


def _chat_template(root: Path, tokenizer_config: dict[str, Any]) -> str:
    """chat_template.jinja, else chat_template.json, else tokenizer_config.json, as transformers looks."""
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text(encoding="utf-8")
    if (root / "chat_template.json").is_file():
        template = _read_json(root, "chat_template.json").get("chat_template")
    else:
        template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # several named templates: the one called "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        raise ValueError(
            f"checkpoint {root} has no chat template (chat_template.jinja, chat_template.json "
            "or tokenizer_config.json 'chat_template')"
        )
    return template


def _generation_ids(
    root: Path, text_config: dict[str, Any], tokenizer: Tokenizer, special_tokens: dict[str, str]
) -> tuple[tuple[int, ...], int | None]:
    """EOS ids and pad id: generation_config.json first, then config.json, then the tokenizer's eos_token."""
    generation = (
        _read_json(root, "generation_config.json") if (root / "generation_config.json").is_file() else {}
    )
    eos = generation.get("eos_token_id", text_config.get("eos_token_id"))
    if eos is None and "eos_token" in special_tokens:
        eos = _token_id(tokenizer, special_tokens["eos_token"])
    if eos is None:
        raise ValueError(f"checkpoint {root} names no eos_token_id (generation_config.json or config.json)")
    eos_ids = tuple(int(i) for i in eos) if isinstance(eos, list) else (int(eos),)
    if not eos_ids:
        raise ValueError(f"checkpoint {root} has an empty eos_token_id list")
    pad = generation.get("pad_token_id", text_config.get("pad_token_id"))
    if pad is None and "pad_token" in special_tokens:
        pad = _token_id(tokenizer, special_tokens["pad_token"])
    return eos_ids, (None if pad is None else int(pad))


def read_tiling(path: str | Path) -> TilingConfig:
    """The tiling a checkpoint directory states, without loading its tokenizer (CLIs check flags with it)."""
    root = Path(path)
    return _tiling(root, _read_json(root, "config.json"))


def _tiling(root: Path, config: dict[str, Any]) -> TilingConfig:
    preprocessor = _read_json(root, "preprocessor_config.json")
    if (root / "processor_config.json").is_file():
        seq_length = _read_json(root, "processor_config.json").get("image_seq_length")
        if seq_length is not None:
            preprocessor = {**preprocessor, "image_seq_length": seq_length}
    return tiling_config_from_files(preprocessor, config)


def _special_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    # tokenizer.json marks added tokens special or not; decode(skip_special_tokens=True) drops the special ones.
    return frozenset(i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special)
