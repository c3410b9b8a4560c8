"""From generated ids to answer text: when to stop, and text deltas for streaming.

``StopRule`` tells after each token whether a sequence is done: an EOS id, the
token budget, or a stop string in the decoded answer. ``TextStream`` turns
the growing token list into text deltas whose concatenation is exactly the
final answer text: it holds back a trailing incomplete UTF-8 character and,
while stop strings are possible, the last characters that could begin one.
Both take the decode function (``prompt.decode_answer`` bound to a
checkpoint); neither runs a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Decode = Callable[[Sequence[int]], str]  # token ids -> text, special tokens removed
INCOMPLETE = "\ufffd"  # what the byte-level decoder shows for a character cut in the middle


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one occurs."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


@dataclass(frozen=True)
class StopRule:
    """When one sequence ends."""

    eos_token_ids: frozenset[int]
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    decode: Decode | None = None  # needed when ``stop`` is not empty

    def finish_reason(self, token_ids: Sequence[int]) -> str | None:
        """ "eos", "stop", "length", or None to go on, after the last of ``token_ids``."""
        if token_ids and token_ids[-1] in self.eos_token_ids:
            return "eos"
        if self.stop and cut_at_stop(self.decode(token_ids), self.stop)[1]:
            return "stop"
        if len(token_ids) >= self.max_new_tokens:
            return "length"
        return None

    def answer_text(self, token_ids: Sequence[int]) -> str:
        """The reply's text: decoded, cut before the first stop string."""
        return cut_at_stop(self.decode(token_ids), self.stop)[0]


class TextStream:
    """Text deltas of one sequence as its tokens arrive."""

    def __init__(self, rule: StopRule) -> None:
        self.rule = rule
        self.tokens: list[int] = []
        self.sent = ""  # text handed out so far
        self._holdback = max((len(s) for s in rule.stop), default=1) - 1

    def push(self, token_ids: Sequence[int], final: bool = False) -> str:
        """Add the new ``token_ids``; returns the text that became certain (maybe "")."""
        self.tokens.extend(int(t) for t in token_ids)
        if final:
            text = self.rule.answer_text(self.tokens)
        else:
            text, stopped = cut_at_stop(self.rule.decode(self.tokens), self.rule.stop)
            text = text.rstrip(INCOMPLETE)
            if not stopped and self._holdback:
                text = text[: max(0, len(text) - self._holdback)]
        if not text.startswith(self.sent):  # a decoder that rewrote earlier text: send nothing until final
            return ""
        delta = text[len(self.sent) :]
        self.sent = text
        return delta
