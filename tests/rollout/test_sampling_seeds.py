"""Every prompt of a step samples from its own random stream (one seed shared by every
prompt gives sample i of every prompt the same draws). Checked with the HF engine, whose sampling
this machine can run seeded per prompt; vLLM on the GPU passes the same per-prompt seeds."""

import dataclasses

from tests.conftest import MAX_PIXELS, MIN_PIXELS
from visualthinker_ray.data.sat import load_sat
from visualthinker_ray.rollout.engine import SamplingSpec, prompt_seed
from visualthinker_ray.rollout.hf_engine import HFEngine


def test_two_identical_prompts_get_different_samples_unless_they_share_a_seed(tiny_model_dir, synthetic_dir):
    engine = HFEngine(tiny_model_dir, MIN_PIXELS, MAX_PIXELS)
    rec = load_sat(str(synthetic_dir / "SAT"), split="train", seed=0).records[0]
    twin = dataclasses.replace(rec, id=rec.id + "-twin")  # the same prompt and image, another id
    spec = SamplingSpec(n=2, temperature=1.0, max_new_tokens=12, seed=1234)

    # what a shared seed does: the same prompt sampled twice from one stream gives the same tokens
    shared = [engine._generate([r], spec, spec.seed) for r in (rec, twin)]
    assert [c.token_ids for c in shared[0]] == [c.token_ids for c in shared[1]]

    # the engine's own seeding: each prompt its own stream, so the twins' samples differ
    comps = engine.generate([rec, twin], spec)
    assert [c.prompt_id for c in comps] == [rec.id, rec.id, twin.id, twin.id]
    assert [c.token_ids for c in comps[:2]] != [c.token_ids for c in comps[2:]]
    assert prompt_seed(spec.seed, rec.id) != prompt_seed(spec.seed, twin.id)
    # and it is reproducible: the same step and prompt give the same samples again
    assert [c.token_ids for c in engine.generate([rec, twin], spec)] == [c.token_ids for c in comps]
