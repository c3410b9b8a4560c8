"""Auxiliary grounding targets for training the synthetic pair: what each visual token shows.

A VLM trained from scratch on answers alone learns the answer prior long before
its vision tower tells a triangle from a star (the first attempts at the pair
sat near chance for thousands of steps). The trainer therefore adds a dense
loss: from each visual token's embedding (the projector's output, the exact
vectors the language model reads), heads predict the colour, shape and digit
of the object that token covers, or "nothing": by default through the LM's own
word embeddings of the attribute words (``TiedGroundingHeads``), else small
linear heads (``GroundingHeads``). The targets
come from the generator's object list and ``token_regions``; the heads are
thrown away after training, so the saved checkpoints are plain
``InternVLForConditionalGeneration`` weights.

Nothing here touches the language model's attention: which tokens it reads
for a question (what SGP's scores measure) is learned from the answers alone.

Each task family has its attributes (``attributes_of``): the basic family's
colour, shape and digit; the crowded family adds the object's size, and its
two-digit numbers label each token with the digit on its side of the object's
centre (the tens digit left, the units digit right). Colour comes first and the
digit last in every family; ``attribute_loss`` relies on that order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from stitchvlm.shared.layout import Layout
from stitchvlm.shared.preprocess import token_regions
from stitchvlm.shared.synthetic import COLOURS, DIGITS, SHAPES, Example

# One head per attribute; class 0 of each is "no object here" (or, for digits, "no digit").
ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "digit": DIGITS}
CROWDED_ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": ("small", "large"), "digit": DIGITS}
_FAMILY_ATTRIBUTES = {"basic": ATTRIBUTES, "crowded": CROWDED_ATTRIBUTES}


def attributes_of(family: str) -> dict[str, tuple[str, ...]]:
    """The attributes the grounding heads predict for a task family (colour first, digit last)."""
    return _FAMILY_ATTRIBUTES[family]


# A token is labelled with an object when they share at least this fraction of the smaller of
# the two boxes (token, object); below it the token is background.
MIN_OVERLAP = 0.25
# The crowded family's large objects sit on the corner of 4 grid tokens (a small one inside one token):
# a 44 px one at +-2 px jitter covers at least 20 x 20 px of each, 0.21 of the object. (The first
# crowded pair's small objects sat on the corner too, as little as 0.17 of them per token.)
CROWDED_MIN_OVERLAP = 0.15


def token_targets(example: Example, layout: Layout) -> np.ndarray:
    """``[num_visual_tokens, len(attributes)]`` int64: the attribute classes of the object under each token.

    Each token takes the object whose box overlaps its image region most; classes
    are 1 + the index in ``attributes_of(example.family)``, 0 for background (and for
    objects without a digit). A two-digit number gives a token the digit on its side of
    the object's centre.
    """
    attributes = attributes_of(example.family)
    width, height = example.image.size
    regions = token_regions(layout, width, height).astype(np.float64)  # [V, 4]
    targets = np.zeros((len(regions), len(attributes)), dtype=np.int64)
    if not example.objects:
        return targets
    boxes = np.array([o.box for o in example.objects], dtype=np.float64)  # [O, 4]
    # overlap: [V, O] intersection areas
    dx = np.minimum(regions[:, None, 2], boxes[None, :, 2]) - np.maximum(
        regions[:, None, 0], boxes[None, :, 0]
    )
    dy = np.minimum(regions[:, None, 3], boxes[None, :, 3]) - np.maximum(
        regions[:, None, 1], boxes[None, :, 1]
    )
    overlap = np.clip(dx, 0, None) * np.clip(dy, 0, None)
    region_area = (regions[:, 2] - regions[:, 0]) * (regions[:, 3] - regions[:, 1])  # [V]
    box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [O]
    share = overlap / np.minimum(region_area[:, None], box_area[None, :])  # [V, O]
    best = share.argmax(axis=1)  # [V]
    least = MIN_OVERLAP if example.family == "basic" else CROWDED_MIN_OVERLAP
    covered = share[np.arange(len(regions)), best] >= least  # [V]
    for token in np.flatnonzero(covered):
        obj = example.objects[best[token]]
        for column, name in enumerate(attributes):
            if name == "digit":
                digit = obj.digit
                if digit is not None and len(digit) == 2:  # tens left of the centre, units right
                    digit = digit[int((regions[token, 0] + regions[token, 2]) / 2 >= obj.centre[0])]
                targets[token, column] = 0 if digit is None else 1 + DIGITS.index(digit)
            else:
                targets[token, column] = 1 + attributes[name].index(getattr(obj, name))
    return targets


def attribute_loss(
    logits: Sequence[torch.Tensor], targets: torch.Tensor, background: bool = True
) -> torch.Tensor:
    """Mean of one cross-entropy per attribute, each over the tokens where it is defined.

    logits: colour, ..., digit, each [batch * V, 1 + classes]; targets: [batch, V, attributes].
    Colour (first) over every token (class 0: background) when ``background``, else over
    the tokens that cover an object like the middle attributes (shape, size); digit (last)
    over those whose object carries a digit. Averaged over all tokens
    instead, background (about 90% of them) would drown the digits, and the models
    never learned to read them.
    """
    targets = targets.reshape(-1, targets.shape[-1])  # [batch * V, 3]
    last = targets.shape[-1] - 1  # the digit column
    on_object, on_digit = targets[:, 0] > 0, targets[:, last] > 0  # [batch * V]
    losses = [nn.functional.cross_entropy(logits[0], targets[:, 0])] if background else []
    on_objects = range(1 if background else 0, last)  # the attributes scored where an object is
    for i, where in [*((i, on_object) for i in on_objects), (last, on_digit)]:
        if where.any():
            losses.append(nn.functional.cross_entropy(logits[i][where], targets[where, i]))
    return torch.stack(losses).mean()


def attribute_accuracy(logits: Sequence[torch.Tensor], targets: torch.Tensor) -> dict[str, float]:
    """Share of tokens whose shape / digit the heads name right, where ``attribute_loss`` scores them."""
    targets = targets.reshape(-1, targets.shape[-1])  # [batch * V, 3]
    out = {}
    last = targets.shape[-1] - 1  # the digit column
    for i, name, where in ((1, "shape", targets[:, 0] > 0), (last, "digit", targets[:, last] > 0)):
        hits = logits[i][where].argmax(-1) == targets[where, i]
        out[f"{name}_acc"] = hits.float().mean().item() if where.any() else float("nan")
    return out


class GroundingHeads(nn.Module):
    """Linear probes from a visual token's embedding to its colour, shape and digit classes."""

    def __init__(self, hidden_size: int, attributes: dict[str, Sequence[str]] = ATTRIBUTES):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(hidden_size, 1 + len(v)) for v in attributes.values())

    def logits(self, visual_embeds: torch.Tensor) -> list[torch.Tensor]:
        """Colour, shape, digit logits, each [batch * V, 1 + classes]; visual_embeds: [batch, V, hidden]."""
        flat = visual_embeds.reshape(-1, visual_embeds.shape[-1])  # [batch * V, hidden]
        return [head(flat) for head in self.heads]


class TiedGroundingHeads(nn.Module):
    """The same probes read through the language model's own (tied) word embeddings.

    The logit of class c for a visual token v is ``v . E[word_c]``, with ``E`` the LM's
    embedding matrix and ``word_c`` the answer token of that colour, shape or digit (plus a
    learned vector per attribute for "nothing"). Visual tokens so learn to look like the words
    the model answers with, which is the vocabulary an answer is read out in.
    """

    def __init__(self, embed_tokens: nn.Embedding, word_ids: dict[str, Sequence[int]]):
        super().__init__()
        self.embed_tokens = embed_tokens  # shared with the model, not a copy
        # word_ids: attribute -> the answer token of each class, in the order of the targets' columns
        self.word_ids = {name: torch.tensor(list(ids)) for name, ids in word_ids.items()}
        self.nothing = nn.Parameter(torch.zeros(len(word_ids), embed_tokens.embedding_dim))

    def logits(self, visual_embeds: torch.Tensor) -> list[torch.Tensor]:
        """As ``GroundingHeads.logits``."""
        flat = visual_embeds.reshape(-1, visual_embeds.shape[-1])  # [batch * V, hidden]
        logits = []
        for i, name in enumerate(self.word_ids):
            classes = torch.cat([self.nothing[i : i + 1], self.embed_tokens.weight[self.word_ids[name]]])
            logits.append(flat @ classes.T)  # [batch * V, 1 + classes]
        return logits


class ProjectorTap:
    """Keeps the multi-modal projector's output of the last forward: the visual tokens' embeddings."""

    def __init__(self, model: nn.Module):
        self.output: torch.Tensor | None = None
        self._handle = model.model.multi_modal_projector.register_forward_hook(self._keep)

    def _keep(self, _module, _inputs, output: torch.Tensor) -> None:
        self.output = output  # [tiles, tokens_per_tile, hidden]

    def visual_embeds(self, batch: int) -> torch.Tensor:
        """[batch, V, hidden]: every example's tiles in order, tokens in raster order within a tile."""
        if self.output is None:
            raise RuntimeError("no forward pass has run since the tap was attached")
        return self.output.reshape(batch, -1, self.output.shape[-1])

    def remove(self) -> None:
        self._handle.remove()


def stack_targets(targets: Sequence[np.ndarray]) -> torch.Tensor:
    """[batch, V, attributes] from each example's ``token_targets`` (one image size, so one V)."""
    return torch.from_numpy(np.stack(targets))
