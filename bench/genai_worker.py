"""onnxruntime-genai's side of ``edge_peer.py``: runs in the peer's own venv, never in the project's.

``edge_peer.py`` starts this script with the genai venv's Python and talks to
it over stdin/stdout, one JSON object per line each way, so the two processes
take turns on the same cores (the benchmark interleaves its columns). It
imports only numpy and onnxruntime_genai; nothing of stitchvlm.

Requests (``{"cmd": ...}``) and their replies:

- ``load`` {name, dir}: open a builder output directory as model ``name``;
  replies {ok, version}.
- ``logits`` {name, ids}: prefill ``ids`` and return the last position's
  logits (``prune_lm_head`` graphs compute no others); replies {logits}.
- ``generate`` {name, ids, new_tokens}: greedy generation of exactly
  ``new_tokens`` tokens (``min_length`` keeps EOS from ending it early);
  replies {prefill_ms, decode_ms, tokens}: prefill_ms is ``append_tokens``
  (the prompt's forward pass) plus the first token's pick, decode_ms the
  ``new_tokens - 1`` passes after it, as Stitch's runtime times its own.
- ``prefill_memory`` {name, ids, new_tokens}: the process's high-water mark
  reset (``/proc/self/clear_refs``), then a generator sized for ``ids`` +
  ``new_tokens`` (its KV buffers) and the prompt's pass; replies {extra_mb,
  prefill_ms}: high-water mark - RSS before, in MB (``edge_stages.py``).
- ``quit``.

Errors come back as {error}; the process goes on.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import onnxruntime_genai as og


def generator(model: og.Model, length: int) -> og.Generator:
    params = og.GeneratorParams(model)
    # greedy, exactly `length` positions: min_length masks EOS until then, as ignore_eos does
    params.set_search_options(do_sample=False, max_length=length, min_length=length, batch_size=1)
    return og.Generator(model, params)


def last_logits(model: og.Model, ids: list[int]) -> list[float]:
    gen = generator(model, len(ids) + 1)
    gen.append_tokens(np.asarray(ids, dtype=np.int32))
    logits = np.asarray(gen.get_logits(), dtype=np.float32)  # [batch, 1, vocab]
    return logits.reshape(-1, logits.shape[-1])[-1].tolist()


def generate(model: og.Model, ids: list[int], new_tokens: int) -> dict:
    gen = generator(model, len(ids) + new_tokens)
    started = time.perf_counter()
    gen.append_tokens(np.asarray(ids, dtype=np.int32))
    gen.generate_next_token()  # picks the first token from the prefill's logits
    tokens = [int(gen.get_next_tokens()[0])]
    prefilled = time.perf_counter()
    while len(tokens) < new_tokens:
        gen.generate_next_token()  # one decode pass on the last token, then its pick
        tokens.append(int(gen.get_next_tokens()[0]))
    finished = time.perf_counter()
    return {
        "prefill_ms": 1e3 * (prefilled - started),
        "decode_ms": 1e3 * (finished - prefilled),
        "tokens": tokens,
    }


def status_mb(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def prefill_memory(model: og.Model, ids: list[int], new_tokens: int) -> dict:
    before = status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := current RSS
    started = time.perf_counter()
    gen = generator(model, len(ids) + new_tokens)
    gen.append_tokens(np.asarray(ids, dtype=np.int32))
    return {"extra_mb": status_mb("VmHWM") - before, "prefill_ms": 1e3 * (time.perf_counter() - started)}


def handle(request: dict, models: dict[str, og.Model]) -> dict:
    cmd = request["cmd"]
    if cmd == "load":
        models[request["name"]] = og.Model(request["dir"])
        return {"ok": True, "version": getattr(og, "__version__", "unknown")}
    if cmd == "logits":
        return {"logits": last_logits(models[request["name"]], request["ids"])}
    if cmd == "generate":
        return generate(models[request["name"]], request["ids"], int(request["new_tokens"]))
    if cmd == "prefill_memory":
        return prefill_memory(models[request["name"]], request["ids"], int(request["new_tokens"]))
    raise ValueError(f"unknown cmd {cmd!r}")


def main() -> int:
    models: dict[str, og.Model] = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "quit":
            break
        try:
            reply = handle(request, models)
        except Exception as error:  # the benchmark reports it and skips the column
            reply = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
