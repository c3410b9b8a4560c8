"""The SEE gate on the exported small model against the PyTorch model it came from.

The reference is ``InternVLForConditionalGeneration`` of the same checkpoint,
fed by transformers' own tokenizer, chat template and GotOcr2ImageProcessorPil:

- S_conf from the softmax probabilities of the greedy tokens ``model.generate``
  picks (``output_logits``);
- S_cons from one teacher-forced forward over [prompt with only the top-r_c
  visual tokens (ranked by the edge's score vector), answer], built from the
  embeddings transformers itself merges (captured at the language model's
  input), with ORIGINAL position ids and an explicit all-ones 2D attention
  mask (without one, transformers reads gaps in position_ids as packed
  sequences and resets attention at each gap).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import make_test_image  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    GotOcr2ImageProcessorPil,
    InternVLForConditionalGeneration,
)

from stitchvlm.edge.export import ExportConfig, export_edge  # noqa: E402
from stitchvlm.edge.gate import GateConfig, consistency_probs, see_gate  # noqa: E402
from stitchvlm.edge.runtime import CPU, EdgeModel  # noqa: E402
from stitchvlm.shared.scoring import top_r_indices  # noqa: E402

MAX_NEW_TOKENS = 8
# ORT and PyTorch run the same float32 math in another order: probabilities of the tiny model
# differ by up to 4.6e-6 relative (measured). Per token p and p' are held to 2e-5 relative,
# the product S_cons of N tokens to N times that.
PROB_RTOL = 2e-5

SAMPLES = [
    ((150, 90, 3), "What colour is the circle?"),  # 3x2 grid + thumbnail: 112 visual tokens
    ((64, 64, 5), "How many stars are there?"),  # one tile: 16 visual tokens
]


def export(checkpoint: Path, out: Path) -> Path:
    export_edge(ExportConfig(model_dir=checkpoint, out_dir=out, verify=False))
    return out


@pytest.fixture(scope="module")
def edge(tiny_checkpoint, tmp_path_factory) -> EdgeModel:
    return EdgeModel.load(export(tiny_checkpoint, tmp_path_factory.mktemp("edge") / "tiny"), providers=[CPU])


class Reference:
    """transformers' side of one checkpoint: inputs, greedy generation, teacher-forced pass."""

    def __init__(self, checkpoint: Path) -> None:
        self.model = InternVLForConditionalGeneration.from_pretrained(
            checkpoint, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.processor = GotOcr2ImageProcessorPil.from_pretrained(checkpoint)
        self.image_token_id = self.model.config.image_token_id

    def inputs(self, image, question: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [1, S], pixel_values [tiles, 3, t, t]) as InternVLProcessor would build them."""
        pixels = self.processor(images=image, crop_to_patches=True, return_tensors="pt")
        n_visual = int(pixels["num_patches"][0]) * self.model.config.image_seq_length
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text = text.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * n_visual + "</img>", 1)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids, pixels["pixel_values"]

    @torch.no_grad()
    def greedy(
        self, ids, pixel_values, eos_ids, max_new_tokens=MAX_NEW_TOKENS
    ) -> tuple[list[int], np.ndarray]:
        """Greedy tokens and the float64 softmax probability of each."""
        out = self.model.generate(
            input_ids=ids,
            pixel_values=pixel_values,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(eos_ids),
            output_logits=True,
            return_dict_in_generate=True,
        )
        tokens = out.sequences[0, ids.shape[1] :].tolist()
        probs = [
            torch.softmax(logits[0].double(), -1)[t].item()
            for logits, t in zip(out.logits, tokens, strict=True)
        ]
        return tokens, np.array(probs)

    @torch.no_grad()
    def pruned_teacher_forced(self, ids, pixel_values, answer: list[int], keep: np.ndarray) -> np.ndarray:
        """p'_i of each answer token with only visual tokens ``keep`` (0..|V|-1) in the prompt."""
        full = torch.cat([ids, torch.tensor([answer[:-1]], dtype=ids.dtype)], dim=1)  # [1, S + N - 1]
        captured = {}

        def capture(_module, _args, kwargs):
            captured["embeds"] = kwargs["inputs_embeds"]

        hook = self.model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.model(input_ids=full, pixel_values=pixel_values)  # merges image features into the embeds
        finally:
            hook.remove()
        embeds = captured["embeds"]  # [1, S + N - 1, hidden]
        visual = torch.nonzero(full[0] == self.image_token_id).flatten()  # [|V|]
        keep_mask = torch.ones(full.shape[1], dtype=torch.bool)
        keep_mask[visual] = False
        keep_mask[visual[torch.from_numpy(keep)]] = True
        positions = torch.arange(full.shape[1])[keep_mask][None]  # [1, S'] original position ids
        logits = self.model(
            inputs_embeds=embeds[:, keep_mask],
            position_ids=positions,
            attention_mask=torch.ones_like(positions),
        ).logits[0, -len(answer) :]  # [N, vocab]
        probs = torch.softmax(logits.double(), -1)
        return probs[torch.arange(len(answer)), torch.tensor(answer)].numpy()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint) -> Reference:
    torch.manual_seed(0)
    return Reference(tiny_checkpoint)


@pytest.mark.parametrize(("size_seed", "question"), SAMPLES)
def test_gate_scores_match_pytorch(edge, reference, size_seed, question):
    """S_conf, S_cons and S equal the values computed from transformers' model. Guards against a
    gate that averages instead of taking the geometric mean, multiplies the wrong tokens, ranks
    the consistency tokens by anything but the edge's scores, shifts positions of kept tokens,
    or feeds the answer one token off."""
    width, height, seed = size_seed
    image = make_test_image(width, height, seed)
    gen = edge.generate(image, question, MAX_NEW_TOKENS)
    ids, pixel_values = reference.inputs(image, question)
    tokens, probs = reference.greedy(ids, pixel_values, edge.files.eos_token_ids)
    assert list(gen.token_ids) == tokens
    np.testing.assert_allclose(gen.token_probs, probs, rtol=PROB_RTOL, atol=0)

    config = GateConfig(tau=0.5, consistency_retention=0.05)
    keep = top_r_indices(gen.visual_scores, config.consistency_retention)
    expected_p_prime = reference.pruned_teacher_forced(ids, pixel_values, tokens, keep)
    np.testing.assert_allclose(consistency_probs(edge, gen, 0.05), expected_p_prime, rtol=PROB_RTOL, atol=0)

    decision = see_gate(edge, gen, config)
    s_conf = math.exp(np.mean(np.log(probs)))
    s_cons = float(np.prod(expected_p_prime))
    assert decision.s_conf == pytest.approx(s_conf, rel=PROB_RTOL, abs=0)
    assert decision.s_cons == pytest.approx(s_cons, rel=len(tokens) * PROB_RTOL, abs=0)
    assert decision.s == pytest.approx((s_conf + s_cons) / 2, rel=len(tokens) * PROB_RTOL, abs=0)


def test_consistency_uses_top_rc_of_edge_scores(edge, reference):
    """The gate's S_cons is not the one of another kept set: r_c = 100% (all tokens) and the
    lowest-scored tokens give other values, each matching its own reference. Guards against a
    gate that ignores r_c or keeps the wrong end of the ranking."""
    image = make_test_image(150, 90, 3)
    question = "What colour is the circle?"
    gen = edge.generate(image, question, MAX_NEW_TOKENS)
    ids, pixel_values = reference.inputs(image, question)
    answer = list(gen.token_ids)

    top = top_r_indices(gen.visual_scores, 0.05)
    bottom = top_r_indices(-gen.visual_scores, 0.05)
    everything = np.arange(gen.layout.num_visual_tokens)
    assert not np.array_equal(top, bottom)
    p_top = reference.pruned_teacher_forced(ids, pixel_values, answer, top)
    p_bottom = reference.pruned_teacher_forced(ids, pixel_values, answer, bottom)
    p_all = reference.pruned_teacher_forced(ids, pixel_values, answer, everything)

    np.testing.assert_allclose(consistency_probs(edge, gen, 0.05), p_top, rtol=PROB_RTOL, atol=0)
    np.testing.assert_allclose(consistency_probs(edge, gen, 1.0), p_all, rtol=PROB_RTOL, atol=0)
    # The kept set matters enough to tell these apart well beyond the tolerance.
    assert np.abs(np.log(p_top) - np.log(p_bottom)).max() > 100 * PROB_RTOL
    assert np.abs(np.log(p_top) - np.log(p_all)).max() > 100 * PROB_RTOL


def test_decision_at_tau_around_s(edge, reference):
    """Exit exactly when S >= tau: tau a hair below the reference S exits, a hair above escalates,
    tau = 0 always exits and tau > 1 never does. Guards against an inverted or strict comparison
    and against a gate that ignores its config."""
    image = make_test_image(64, 64, 5)
    question = "How many stars are there?"
    gen = edge.generate(image, question, MAX_NEW_TOKENS)
    ids, pixel_values = reference.inputs(image, question)
    tokens, probs = reference.greedy(ids, pixel_values, edge.files.eos_token_ids)
    keep = top_r_indices(gen.visual_scores, 0.05)
    s_ref = (
        math.exp(np.mean(np.log(probs)))
        + np.prod(reference.pruned_teacher_forced(ids, pixel_values, tokens, keep))
    ) / 2

    margin = 1e-3 * s_ref  # well above the ORT/PyTorch difference of S (~1e-5 relative)
    below = see_gate(edge, gen, GateConfig(tau=s_ref - margin))
    above = see_gate(edge, gen, GateConfig(tau=s_ref + margin))
    assert below.exit_on_edge and not above.exit_on_edge
    assert below.s == above.s and below.tau == pytest.approx(s_ref - margin)
    assert see_gate(edge, gen, GateConfig(tau=0.0)).exit_on_edge
    assert not see_gate(edge, gen, GateConfig(tau=1.01)).exit_on_edge
    exact = see_gate(edge, gen, GateConfig(tau=below.s))
    assert exact.exit_on_edge  # S >= tau, not S > tau


@pytest.fixture(scope="module")
def two_eos_checkpoint(tiny_checkpoint, edge, tmp_path_factory) -> tuple[Path, int]:
    """A copy of the tiny checkpoint whose generation config names a second EOS id: the token the
    model greedily generates third for the EOS sample, so generation ends on an EOS there."""
    gen = edge.generate(make_test_image(*EOS_SAMPLE[0]), EOS_SAMPLE[1], MAX_NEW_TOKENS)
    step = next(i for i in range(2, len(gen.token_ids)) if gen.token_ids[i] not in gen.token_ids[:i])
    stop = gen.token_ids[step]
    target = tmp_path_factory.mktemp("eos") / "tiny-two-eos"
    shutil.copytree(tiny_checkpoint, target)
    path = target / "generation_config.json"
    generation = json.loads(path.read_text())
    generation["eos_token_id"] = [generation["eos_token_id"], stop]
    path.write_text(json.dumps(generation))
    return target, step


EOS_SAMPLE = ((150, 90, 3), "What colour is the circle?")


def test_eos_counts_in_both_scores(two_eos_checkpoint, reference, tmp_path):
    """When generation ends on an EOS, its probability is part of S_conf and S_cons (DESIGN: EOS
    included when generated). Guards against dropping the stop token from either score."""
    checkpoint, step = two_eos_checkpoint
    edge = EdgeModel.load(export(checkpoint, tmp_path / "edge"), providers=[CPU])
    image = make_test_image(*EOS_SAMPLE[0])
    gen = edge.generate(image, EOS_SAMPLE[1], MAX_NEW_TOKENS)
    assert len(gen.token_ids) == step + 1 and gen.token_ids[-1] in edge.files.eos_token_ids

    ids, pixel_values = reference.inputs(image, EOS_SAMPLE[1])
    tokens, probs = reference.greedy(ids, pixel_values, edge.files.eos_token_ids)
    assert tokens == list(gen.token_ids)  # transformers stops on the same EOS
    keep = top_r_indices(gen.visual_scores, 0.05)
    p_prime = reference.pruned_teacher_forced(ids, pixel_values, tokens, keep)

    decision = see_gate(edge, gen, GateConfig())
    assert decision.s_conf == pytest.approx(math.exp(np.mean(np.log(probs))), rel=PROB_RTOL, abs=0)
    assert decision.s_cons == pytest.approx(float(np.prod(p_prime)), rel=len(tokens) * PROB_RTOL, abs=0)
    # Without the EOS both would differ by far more than the tolerance.
    assert decision.s_conf != pytest.approx(math.exp(np.mean(np.log(probs[:-1]))), rel=100 * PROB_RTOL)
    assert decision.s_cons != pytest.approx(float(np.prod(p_prime[:-1])), rel=100 * PROB_RTOL)


def test_gate_config_refuses_bad_values():
    """A NaN tau or an r_c outside (0, 1] is refused up front instead of gating on garbage."""
    for kwargs in ({"tau": float("nan")}, {"consistency_retention": 0.0}, {"consistency_retention": 1.5}):
        with pytest.raises(ValueError):
            GateConfig(**kwargs)
