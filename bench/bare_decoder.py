"""One decoder file as a bare ONNX Runtime session: a prefill and decode steps, KV buffers bound once.

    python bench/bare_decoder.py EXPORT/decoder.onnx [--prompt 465] [--repeats 3] [--steps 20]
    runs/genai-venv/bin/python bench/bare_decoder.py GENAI_DIR/model.onnx      # in genai's own ORT

``bench/edge_peer.py`` times whole generate loops, each side in its own venv
and so in its own ONNX Runtime build. This times the graphs alone, in
whichever onnxruntime runs this file, so that Stitch's lean decoder and
onnxruntime-genai's builder output can be compared inside one build (and one
graph across builds). It imports only numpy and onnxruntime, so it runs in
genai's venv too.

Both graph kinds share their KV buffers between past and present: each
``past*`` input is bound to a ``[batch, kv_heads, capacity, head_dim]`` buffer
that the matching ``present*`` output writes into (Stitch's ``past_key_i`` ->
``present_key_i``, genai's ``past_key_values.i.key`` -> ``present.i.key``).
The prompt is random embeddings (Stitch) or a repeated token id (genai), the
mask all ones; Stitch's graph scores the last ``--score-rows`` prompt rows and
the decode step's row. A prefill is timed ``--repeats`` times (best kept), a
decode step as the mean of ``--steps`` passes at the same position (best of
``--repeats``). genai's graphs may leave the head dimension symbolic: give it
as ``--head-dim``. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort


def present_name(past: str) -> str:
    """The output a ``past*`` input's buffer is written back through."""
    if past.startswith("past_key_values."):  # genai: past_key_values.0.key -> present.0.key
        return "present." + past.removeprefix("past_key_values.")
    return "present_" + past.removeprefix("past_")  # Stitch: past_key_0 -> present_key_0


class BareDecoder:
    """A decoder session with its KV buffers bound as past and present."""

    def __init__(
        self, path: Path, capacity: int, threads: int = 1, seed: int = 0, head_dim: int | None = None
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        pasts = [name for name in self.inputs if name.startswith("past")]
        missing = [name for name in pasts if present_name(name) not in outputs]
        if not pasts or missing:
            raise ValueError(f"{path}: no shared-buffer KV cache (past inputs {pasts}, unmatched {missing})")
        self.host_outputs = [name for name in outputs if not name.startswith("present")]
        self.buffers = {}
        for name in pasts:
            _, kv_heads, _, dim = self.inputs[name].shape
            dim = dim if isinstance(dim, int) else head_dim  # genai may name it ("kv_cache_dim")
            if dim is None:
                raise ValueError(f"{path}: {name} has a symbolic head dimension; give --head-dim")
            zeros = np.zeros((1, kv_heads, capacity, dim), np.float32)
            self.buffers[name] = ort.OrtValue.ortvalue_from_numpy(zeros)
        self.rng = np.random.default_rng(seed)

    def bind(self, seq: int, total: int, score_rows: int) -> ort.IOBinding:
        """One pass of ``seq`` new positions ending at ``total`` filled ones."""
        binding = self.session.io_binding()
        for name in self.host_outputs:  # first, so that they lead get_outputs()
            binding.bind_output(name, "cpu")
        for name, buffer in self.buffers.items():
            binding.bind_ortvalue_input(name, buffer)
            binding.bind_ortvalue_output(present_name(name), buffer)
        if "input_ids" in self.inputs:
            binding.bind_cpu_input("input_ids", np.full((1, seq), 5, np.int64))
        if "inputs_embeds" in self.inputs:
            hidden = self.inputs["inputs_embeds"].shape[2]
            binding.bind_cpu_input("inputs_embeds", (self.rng.standard_normal((1, seq, hidden)) * 0.02).astype(np.float32))  # fmt: skip
        if "position_ids" in self.inputs:
            binding.bind_cpu_input("position_ids", np.arange(total - seq, total)[None])
        binding.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        if "score_query_mask" in self.inputs:
            binding.bind_cpu_input("score_query_mask", (np.arange(seq) >= seq - score_rows).astype(np.float32)[None])  # fmt: skip
        if "num_logits" in self.inputs:
            binding.bind_cpu_input("num_logits", np.array(1, np.int64))
        return binding

    def run(self, binding: ort.IOBinding) -> dict[str, np.ndarray]:
        """One pass; its host outputs (logits, and Stitch's visual_scores) by name."""
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()[: len(self.host_outputs)]
        return {name: value.numpy() for name, value in zip(self.host_outputs, outputs, strict=True)}


def measure(
    path: Path,
    prompt: int,
    repeats: int,
    steps: int,
    score_rows: int,
    threads: int,
    head_dim: int | None = None,
) -> dict:
    decoder = BareDecoder(path, capacity=prompt + 1, threads=threads, head_dim=head_dim)
    prefills, decodes = [], []
    for _ in range(repeats):
        binding = decoder.bind(prompt, prompt, score_rows)
        started = time.perf_counter()
        decoder.session.run_with_iobinding(binding)
        prefills.append(time.perf_counter() - started)
        binding = decoder.bind(1, prompt + 1, 1)
        started = time.perf_counter()
        for _ in range(steps):
            decoder.session.run_with_iobinding(binding)
        decodes.append((time.perf_counter() - started) / steps)
    return {
        "onnxruntime": ort.__version__,
        "graph": str(path),
        "threads": threads,
        "prompt": prompt,
        "prefill_ms": round(min(prefills) * 1e3, 1),
        "decode_step_ms": round(min(decodes) * 1e3, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "decoder", type=Path, help="a decoder .onnx with shared-buffer KV (Stitch lean, genai)"
    )
    parser.add_argument("--prompt", type=int, default=465, help="prefill length (default 465)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="decode passes per repeat")
    parser.add_argument("--score-rows", type=int, default=17, help="prompt rows Stitch's graph scores")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=None, help="where the graph leaves it symbolic")
    args = parser.parse_args(argv)
    if not args.decoder.is_file():
        parser.error(f"{args.decoder}: no such file")
    try:
        result = measure(
            args.decoder, args.prompt, args.repeats, args.steps, args.score_rows, args.threads, args.head_dim
        )
    except ValueError as error:
        parser.error(str(error))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
