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
# A token is labelled with an object when they share at least this fraction of the smaller of
# the two boxes (token, object); below it the token is background.
MIN_OVERLAP = 0.25


def token_targets(example: Example, layout: Layout) -> np.ndarray:
    """``[num_visual_tokens, 3]`` int64: colour, shape, digit class of the object under each token.

    Each token takes the object whose box overlaps its image region most; classes
    are 1 + the index in ``ATTRIBUTES``, 0 for background (and for objects without a digit).
    """
    width, height = example.image.size
    regions = token_regions(layout, width, height).astype(np.float64)  # [V, 4]
    targets = np.zeros((len(regions), len(ATTRIBUTES)), dtype=np.int64)
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
    covered = share[np.arange(len(regions)), best] >= MIN_OVERLAP  # [V]
    for token in np.flatnonzero(covered):
        obj = example.objects[best[token]]
        targets[token, 0] = 1 + ATTRIBUTES["colour"].index(obj.colour)
        targets[token, 1] = 1 + ATTRIBUTES["shape"].index(obj.shape)
        targets[token, 2] = 0 if obj.digit is None else 1 + ATTRIBUTES["digit"].index(obj.digit)
    return targets


def attribute_loss(logits: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Mean of three cross-entropies, each over the tokens where its attribute is defined.

    logits: colour, shape, digit, each [batch * V, 1 + classes]; targets: [batch, V, 3].
    Colour over every token (class 0: background), shape over the tokens that cover an
    object, digit over those whose object carries a digit. Averaged over all tokens
    instead, background (about 90% of them) would drown the digits, and the models
    never learned to read them.
    """
    targets = targets.reshape(-1, targets.shape[-1])  # [batch * V, 3]
    on_object, on_digit = targets[:, 0] > 0, targets[:, 2] > 0  # [batch * V]
    losses = [nn.functional.cross_entropy(logits[0], targets[:, 0])]
    for i, where in ((1, on_object), (2, on_digit)):
        if where.any():
            losses.append(nn.functional.cross_entropy(logits[i][where], targets[where, i]))
    return torch.stack(losses).mean()


def attribute_accuracy(logits: Sequence[torch.Tensor], targets: torch.Tensor) -> dict[str, float]:
    """Share of tokens whose shape / digit the heads name right, where ``attribute_loss`` scores them."""
    targets = targets.reshape(-1, targets.shape[-1])  # [batch * V, 3]
    out = {}
    for i, name, where in ((1, "shape", targets[:, 0] > 0), (2, "digit", targets[:, 2] > 0)):
        hits = logits[i][where].argmax(-1) == targets[where, i]
        out[f"{name}_acc"] = hits.float().mean().item() if where.any() else float("nan")
    return out


class GroundingHeads(nn.Module):
    """Linear probes from a visual token's embedding to its colour, shape and digit classes."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(hidden_size, 1 + len(v)) for v in ATTRIBUTES.values())

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
        self.word_ids = {name: torch.tensor(list(word_ids[name])) for name in ATTRIBUTES}
        self.nothing = nn.Parameter(torch.zeros(len(ATTRIBUTES), embed_tokens.embedding_dim))

    def logits(self, visual_embeds: torch.Tensor) -> list[torch.Tensor]:
        """As ``GroundingHeads.logits``."""
        flat = visual_embeds.reshape(-1, visual_embeds.shape[-1])  # [batch * V, hidden]
        logits = []
        for i, name in enumerate(ATTRIBUTES):
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
    """[batch, V, 3] from each example's ``token_targets`` (one image size, so one V)."""
    return torch.from_numpy(np.stack(targets))
