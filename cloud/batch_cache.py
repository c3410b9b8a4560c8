"""A KV cache for a batch of pruned sequences: per-layer, per-row lengths.

SGP makes KV lengths differ by layer (layers ``< K`` hold the full prompt,
layers ``>= K`` the pruned one) and by request, so the batch cannot share one
sequence length. ``RowKVCache`` is a ``transformers`` ``Cache`` whose layers
(``RowKVLayer``) keep one padded buffer ``[rows, kv_heads, capacity,
head_dim]`` each, with every row's own length. A decode step writes each row's
new key and value at that row's length in every layer and hands the attention
the buffer up to the longest row; ``decode_masks`` gives the additive masks
that hide the padding (and stale values of rows that left) from SDPA or eager
attention. Rows are packed at ``0..rows-1``: a row that leaves is replaced by
the last one (one row copied, never the whole batch).

Memory: each layer's buffers grow (rows doubling up to ``max_rows``,
positions by at least half again, never past ``max_length``) and stay until
the batch empties, so keys and values never take more than
``2 * layers * max_rows * kv_heads * max_length * head_dim`` elements.

What it does not do: decide which sequences run (``scheduler``), compute
anything (``sgp``), or page memory.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

# Buffers grow in steps of at least this many positions, so a decode step rarely reallocates.
MIN_GROWTH = 64


class RowKVLayer(CacheLayerMixin):
    """One decoder layer's keys and values for the rows of a batch, each row with its own length."""

    is_sliding = False

    def __init__(self, max_rows: int = 1, max_length: int | None = None) -> None:
        super().__init__()
        self.max_rows = max_rows  # rows the buffers may grow to (the batch size limit)
        self.max_length = max_length  # positions they may grow to (the model's context); None = unbounded
        self.lengths: list[int] = []  # valid positions per row, rows 0..len-1
        self._positions: torch.Tensor | None = None  # [rows] write positions of the current decode step
        self._rows: torch.Tensor | None = None  # [rows] arange, the row index of those writes

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # key_states: [1, kv_heads, S, head_dim]
        _, heads, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = torch.zeros(1, heads, MIN_GROWTH, head_dim, dtype=self.dtype, device=self.device)
        self.values = torch.zeros_like(self.keys)
        self.is_initialized = True

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, positions) the buffers hold now."""
        return (0, 0) if self.keys is None else (self.keys.shape[0], self.keys.shape[2])

    def _reserve(self, rows: int, length: int) -> None:
        """Grow the buffers to hold ``rows`` rows of ``length`` positions (copying what is there)."""
        have_rows, have_len = self.capacity
        if rows <= have_rows and length <= have_len:
            return
        # rows double (up to max_rows) so that joining requests rarely reallocate
        new_rows = have_rows if rows <= have_rows else max(rows, min(self.max_rows, 2 * have_rows))
        new_len = have_len if length <= have_len else max(length, have_len + max(MIN_GROWTH, have_len // 2))
        if self.max_length is not None:
            new_len = max(length, min(new_len, self.max_length))
        shape = (new_rows, self.keys.shape[1], new_len, self.keys.shape[3])
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros_like(keys)
        keys[:have_rows, :, :have_len] = self.keys
        values[:have_rows, :, :have_len] = self.values
        self.keys, self.values = keys, values

    def append_row(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add a row holding ``keys``/``values`` [1, kv_heads, n, head_dim] (a prefilled sequence)."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        n = keys.shape[2]
        row = self.rows
        self._reserve(row + 1, n)
        self.keys[row, :, :n] = keys[0]
        self.values[row, :, :n] = values[0]
        self.lengths.append(n)

    def remove_row(self, row: int) -> None:
        """Drop ``row``; the last row moves into its place."""
        last = self.rows - 1
        if row != last:
            n = self.lengths[last]
            self.keys[row, :, :n] = self.keys[last, :, :n]
            self.values[row, :, :n] = self.values[last, :, :n]
            self.lengths[row] = n
        self.lengths.pop()

    def begin_step(self, positions: torch.Tensor, rows: torch.Tensor) -> None:
        """Before a decode step: room for one more position per row, and where each row writes it.

        positions: [rows] this layer's lengths on its device; rows: arange(rows) there (both
        shared by the layers with the same lengths, so a step copies them to the device once).
        """
        self._reserve(self.rows, max(self.lengths) + 1)
        self._positions, self._rows = positions, rows

    def end_step(self, completed: bool = True) -> None:
        """After a decode step; ``completed=False`` (the step failed) leaves every length as it was."""
        if completed:
            self.lengths = [n + 1 for n in self.lengths]
        self._positions = self._rows = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states/value_states: [rows, kv_heads, 1, head_dim] -> buffers [rows, kv_heads, L + 1, head_dim]."""
        if self._positions is None:
            raise RuntimeError("RowKVLayer.update outside a decode step (call RowKVCache.begin_step first)")
        if key_states.shape[0] != self.rows or key_states.shape[2] != 1:
            raise ValueError(
                f"a decode step takes one new position per row: got {tuple(key_states.shape)} for {self.rows} rows"
            )
        self.keys[self._rows, :, self._positions] = key_states[:, :, 0]
        self.values[self._rows, :, self._positions] = value_states[:, :, 0]
        end = max(self.lengths) + 1
        return self.keys[: self.rows, :, :end], self.values[: self.rows, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        """The longest row (the padded length attention sees before this step)."""
        return max(self.lengths, default=0)

    def get_max_length(self) -> int:
        return -1

    def release_memory(self) -> None:
        """Free the buffers once no row is left (the next prefill allocates again)."""
        if self.rows == 0:
            self.keys = self.values = None
            self.is_initialized = False


class RowKVCache(Cache):
    """The per-row, per-layer KV cache of one running batch (see the module docstring)."""

    def __init__(self, num_layers: int, max_rows: int = 1, max_length: int | None = None) -> None:
        super().__init__(layers=[RowKVLayer(max_rows, max_length) for _ in range(num_layers)])

    @property
    def rows(self) -> int:
        return self.layers[0].rows

    def lengths(self, row: int) -> list[int]:
        """KV length of ``row`` in every layer."""
        return [layer.lengths[row] for layer in self.layers]

    def append(self, prefilled: DynamicCache) -> int:
        """Add one prefilled sequence (batch 1) as the last row; returns its row index."""
        if len(prefilled.layers) != len(self.layers):
            raise ValueError(
                f"the prefill cache has {len(prefilled.layers)} layers, this one {len(self.layers)}"
            )
        for mine, theirs in zip(self.layers, prefilled.layers, strict=True):
            if theirs.keys is None or theirs.keys.shape[0] != 1:
                raise ValueError("append takes the cache of one prefilled sequence")
            mine.append_row(theirs.keys, theirs.values)
        return self.rows - 1

    def remove(self, row: int) -> None:
        """Drop ``row``; the last row takes its index (callers mirror this in their own row list)."""
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} outside 0..{self.rows - 1}")
        for layer in self.layers:
            layer.remove_row(row)
            layer.release_memory()

    def begin_step(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """Prepare a decode step; returns per layer the additive mask [rows, 1, 1, L_layer + 1].

        Row r of layer l attends to its ``lengths[r] + 1`` first positions (its
        cache and the new token); the rest of the padded buffer gets the
        dtype's minimum, so softmax gives it exactly zero weight.
        """
        masks: list[torch.Tensor] = []
        # one (write positions, mask) per distinct length profile: layers < K share one, >= K another
        by_lengths: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        rows = None
        for layer in self.layers:
            key = tuple(layer.lengths)
            if key not in by_lengths:
                positions = torch.tensor(key, dtype=torch.long, device=layer.device)  # [rows]
                span = torch.arange(max(key) + 1, device=layer.device)[None]  # [1, L + 1]
                mask = torch.zeros(span.shape[1], dtype=dtype, device=layer.device).expand(len(key), -1)
                mask = mask.masked_fill(span > positions[:, None], torch.finfo(dtype).min)
                by_lengths[key] = positions, mask[:, None, None, :]
            positions, mask = by_lengths[key]
            if rows is None or rows.device != positions.device:
                rows = torch.arange(len(key), device=positions.device)
            layer.begin_step(positions, rows)
            masks.append(mask)
        return masks

    def end_step(self, completed: bool = True) -> None:
        """After a decode step: every row one position longer (``completed=False``: unchanged)."""
        for layer in self.layers:
            layer.end_step(completed)

    def nbytes(self) -> int:
        """Bytes the key and value buffers take now."""
        return sum(
            2 * layer.keys.numel() * layer.keys.element_size()
            for layer in self.layers
            if layer.keys is not None
        )
