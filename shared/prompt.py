"""Prompt token ids for one image and one question, as transformers' InternVL path builds them.

The edge must feed its ONNX model the same ids that ``InternVLProcessor`` and
``apply_chat_template`` give the PyTorch model, and the cloud must agree with
the edge about where the visual tokens sit. This module renders the
checkpoint's chat template with a sandboxed Jinja environment configured as
transformers configures it, expands the image placeholder to ``<img>`` +
``<IMG_CONTEXT>`` * n + ``</img>`` as ``InternVLProcessor.replace_image_token``
does, and tokenizes with the ``tokenizers`` library. No torch, no transformers.

It does not decide n (``preprocess`` computes the layout) and does not run any
model. A question that contains special-token text (``<img>``, ``<|im_end|>``,
...) is refused: transformers would turn it into control tokens and shift the
visual tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

import jinja2
import numpy as np
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .model_files import ModelFiles


@dataclass(frozen=True, eq=False)
class PromptIds:
    """The prompt of one request, with its visual tokens located."""

    input_ids: np.ndarray  # [S] int64; writable (torch.from_numpy warns on read-only arrays), do not modify
    visual_start: int  # index of the first <IMG_CONTEXT> in input_ids
    num_visual_tokens: int  # |V|: <IMG_CONTEXT> tokens, contiguous from visual_start

    @property
    def visual_end(self) -> int:
        """One past the last visual token."""
        return self.visual_start + self.num_visual_tokens


def build_prompt(files: ModelFiles, question: str, num_visual_tokens: int) -> PromptIds:
    """Token ids of a user turn holding one image then ``question``, plus the assistant header.

    Equal to ``tokenizer(processor_expand(apply_chat_template(messages,
    add_generation_prompt=True)))["input_ids"]`` for
    ``messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]``.
    Raises ``ValueError`` for a non-positive token count, a question holding
    special-token text, or a template that does not place exactly one image.
    """
    if (
        isinstance(num_visual_tokens, bool)
        or int(num_visual_tokens) != num_visual_tokens
        or num_visual_tokens < 1
    ):
        raise ValueError(f"num_visual_tokens must be a positive integer, got {num_visual_tokens!r}")
    _refuse_special_text(files, question)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = render_chat_template(files, messages, add_generation_prompt=True)

    placeholder = _image_placeholder(files, text)
    visual = (
        files.image_start_token + files.image_context_token * int(num_visual_tokens) + files.image_end_token
    )
    text = text.replace(placeholder, visual, 1)

    # add_special_tokens=True: the post-processor runs as in tokenizer(text) (a BOS if the checkpoint adds one).
    ids = np.asarray(files.tokenizer.encode(text, add_special_tokens=True).ids, dtype=np.int64)
    # input_ids: [S]
    positions = np.flatnonzero(ids == files.image_context_id)
    if len(positions) != num_visual_tokens or positions[-1] - positions[0] != num_visual_tokens - 1:
        raise ValueError("image context tokens are not one contiguous run of num_visual_tokens")
    return PromptIds(input_ids=ids, visual_start=int(positions[0]), num_visual_tokens=int(num_visual_tokens))


def check_chat_template(files: ModelFiles) -> None:
    """Refuse, with a ``ValueError`` saying why, a checkpoint whose chat template cannot serve requests.

    Builds the prompt of one image of one visual token and a plain question,
    as every request's prompt is built, and checks that it holds exactly one
    ``<img>`` ``<IMG_CONTEXT>`` ``</img>`` span. Servers call this at load time
    so that such a checkpoint never reports SERVING and then refuses every
    request as the client's fault.
    """
    where = f"checkpoint {files.path}: the chat template cannot be served"
    try:
        prompt = build_prompt(files, "Describe the image.", 1)
    except (ValueError, jinja2.TemplateError) as exc:
        raise ValueError(f"{where}: {exc}") from exc
    ids = prompt.input_ids.tolist()  # [S]
    span = ids[prompt.visual_start - 1 : prompt.visual_end + 1]
    expected = [files.image_start_id, files.image_context_id, files.image_end_id]
    counts = [ids.count(token) for token in expected]
    if span != expected or counts != [1, 1, 1]:
        raise ValueError(
            f"{where}: the prompt of one image does not hold one {files.image_start_token}"
            f"{files.image_context_token}{files.image_end_token} span (token counts {counts})"
        )


def answer_ids(files: ModelFiles, text: str, add_eos: bool = False) -> list[int]:
    """Token ids of an assistant answer, to append to ``build_prompt`` ids for teacher forcing.

    The prompt ends with the assistant header's newline, so encoding the
    answer on its own matches encoding prompt and answer together unless the
    answer itself starts with a newline. ``add_eos`` appends the first EOS id
    (``<|im_end|>`` for InternVL3), the token a trained model ends its turn with.
    """
    ids = files.tokenizer.encode(text, add_special_tokens=False).ids
    return [*ids, files.eos_token_ids[0]] if add_eos else ids


def decode_answer(files: ModelFiles, token_ids: Sequence[int] | np.ndarray) -> str:
    """Text of generated ids without special tokens, as ``tokenizer.decode(ids, skip_special_tokens=True)``."""
    return files.tokenizer.decode([int(i) for i in token_ids], skip_special_tokens=True)


def render_chat_template(files: ModelFiles, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The checkpoint's chat template rendered with the variables transformers passes to it."""
    template = _compile(files.chat_template)
    return template.render(
        messages=messages,
        tools=None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **files.special_tokens,
    )


def _image_placeholder(files: ModelFiles, text: str) -> str:
    """The one image placeholder the rendered template holds (the context token or its alias)."""
    counts = {placeholder: text.count(placeholder) for placeholder in files.image_placeholders}
    placed = [placeholder for placeholder, count in counts.items() if count]
    if len(placed) != 1 or counts[placed[0]] != 1:
        found = ", ".join(f"{count} x {placeholder}" for placeholder, count in counts.items())
        raise ValueError(
            f"chat template placed {sum(counts.values())} image placeholders ({found}), expected 1"
        )
    return placed[0]


def _refuse_special_text(files: ModelFiles, question: str) -> None:
    for token_id in files.special_token_ids:
        token = files.tokenizer.id_to_token(token_id)
        if token and token in question:
            raise ValueError(f"question contains the special token {token!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers replaces Jinja's tojson, which HTML-escapes, with plain json.dumps.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    # The environment transformers uses for chat templates: sandboxed, trim/lstrip blocks, loop controls.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
