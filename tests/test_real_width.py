"""Qwen2-VL-2B's width through the whole system: real Ray, vLLM multiprocess at tensor parallel 2,
FSDP2, a grader, GRPO steps and the weight sync, on a random model with the real hidden size, heads
(2 KV heads: one per TP rank), 151,936-token vocabulary tied to the output layer, the real special
ids, a 1280-wide vision tower, and hundreds of image tokens per prompt. One decoder layer and two
vision blocks keep it to 355M float32 parameters (7 min on 2 AVX2 cores: outside the default run); bench/bench_real_size.py
runs the same in bf16 with its memory and time."""

import json

import pytest
import ray
from safetensors.torch import save_file

from visualthinker_ray.config import DEFAULT_MAX_PIXELS, load_config
from visualthinker_ray.rollout.vllm_engine import hf_parameter_shapes
from visualthinker_ray.toy.real_shape import QWEN2_VL_2B, make_real_shape_model
from visualthinker_ray.toy.synthetic import make_synthetic
from visualthinker_ray.trainer import Trainer

pytestmark = pytest.mark.real_width  # ~7 min: outside the default run (setup.cfg)

MIN_PIXELS, MAX_PIXELS = 3136, 401408  # RECIPE
IMAGE_SIZE = 448  # px: 32 x 32 patches, 256 image tokens a prompt
BUCKET_MB = 64  # the 933 MB float32 embedding travels alone, the rest in several buckets


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def real_width_dir(tmp_path_factory):
    # Saved with the tiny default pixel bounds (at most 16 image tokens), run at the recipe's: the
    # engine must take the configured bounds, not the checkpoint's, or its prompts are not the learner's.
    out = make_real_shape_model(
        tmp_path_factory.mktemp("real-width"), num_layers=1, vision_depth=2, dtype="float32"
    )
    saved = json.loads((out / "processor_config.json").read_text())["image_processor"]["size"]
    assert saved["longest_edge"] == DEFAULT_MAX_PIXELS < MAX_PIXELS
    return out


@pytest.fixture(scope="module")
def big_image_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("real-width-data")
    make_synthetic(out, n_train=8, n_test=4, seed=0, image_size=IMAGE_SIZE)
    return out


def test_real_width_steps_sync_every_tp_rank_exactly_at_tensor_parallel_2(
    real_width_dir, big_image_data, tmp_path
):
    """Two steps with a large learning rate and a reward with variance, so the weights really move;
    after each sync the weights served inside both vLLM workers (each with half the heads, one KV
    head each, and half the 152k-row tied embedding) are exactly what vLLM's own loader makes of the
    learner's state dict; the engine's log-probs of step 2 (sampled after step 1's sync, over 256
    image tokens of prompt) equal the learner's; the probe after step 1's sync agrees."""
    shapes, tied = hf_parameter_shapes(str(real_width_dir))
    assert tied == {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    embedding = shapes["model.language_model.embed_tokens.weight"]
    assert embedding == (QWEN2_VL_2B["vocab_size"], QWEN2_VL_2B["hidden_size"])
    assert embedding[0] * embedding[1] * 4 > BUCKET_MB * 2**20  # bigger than a bucket
    cfg = load_config(
        None,
        [
            f"model.path={real_width_dir}",
            f"model.min_pixels={MIN_PIXELS}",
            f"model.max_pixels={MAX_PIXELS}",
            f"data.train={big_image_data / 'SAT'}",
            f"data.eval={big_image_data / 'CV-Bench'}",
            f"logging.dir={tmp_path}",
            "rollout.engine=vllm",
            "rollout.num_workers=1",
            "rollout.tensor_parallel_size=2",
            "rollout.max_model_len=1024",
            "rollout.max_new_tokens=12",
            f"rollout.sync_bucket_mb={BUCKET_MB}",
            # 24 GB: the learner peaks at ~24 B per trained fp32 parameter (weights, gradients, AdamW,
            # FSDP's unsharded copies) beside two vLLM workers (~3.7 GB each) and this driver's copies
            # of the state dict; the reference (beta) and the vision tower's state are left out.
            "algorithm.beta=0",
            "model.freeze_vision=true",
            "learner.num_workers=1",
            "learner.lr=1e-2",
            "learner.lr_schedule=constant",
            "reward.num_workers=1",
            "reward.plugins=[{name: parity, function: 'tests.e2e_plugins:length_parity'}]",
            "algorithm.group_size=4",
            "algorithm.prompts_per_step=1",
            "algorithm.max_steps=2",
            "algorithm.max_staleness=0",
            "checkpoint.every=100",
            "resources.collective_timeout_s=600",
            "eval.at_start=false",
        ],
    )
    trainer = Trainer(cfg)
    try:
        # the driver keeps only the decoder layer's weights between steps (memory: 24 GB hold it all)
        previous = {n: t for n, t in trainer.learner.full_state_dict().items() if ".layers." in n}
        for step in range(1, 3):
            metrics = trainer.train_step()  # generate, grade, update, sync (and the probe after step 1)
            trainer.step += 1
            assert metrics["advantage/zero_std_group_frac"] < 1 and metrics["learner/grad_norm"] > 0, metrics
            # the learner's prompts were the engine's (learner/worker.check_prompt_len): 256 image tokens
            assert metrics["learner/tokens"] >= 4 * (IMAGE_SIZE // 28) ** 2
            weights = trainer.learner.full_state_dict()
            moved = max((weights[n] - previous[n]).abs().max().item() for n in previous)
            assert moved > 1e-4, f"step {step}: the update left the weights where they were"
            previous = {n: weights[n] for n in previous}
            path = tmp_path / "learner.safetensors"
            save_file({**weights, **{a: weights[src].clone() for a, src in tied.items()}}, str(path))
            del weights
            per_rank = ray.get(trainer.rollout.workers[0].compare_weights.remote(str(path)), timeout=600)
            assert sorted(r["rank"] for r in per_rank) == [0, 1]
            for r in per_rank:
                assert r["tensors"] > 20 and not r["unequal"], (
                    f"step {step}, TP rank {r['rank']}: {r['unequal']}"
                )
            if step == 1:
                assert metrics["sync/probe_engines"] == 1 and metrics["sync/probe_mismatch_max"] < 1e-4, (
                    metrics
                )
            else:  # sampled with step 1's synced weights
                assert metrics["learner/logprob_mismatch"] < 1e-3, metrics["learner/logprob_mismatch"]
                assert metrics["learner/logprob_mismatch_max"] < 1e-2, metrics["learner/logprob_mismatch_max"]
        assert trainer.rollout.policy_versions() == [2]
    finally:
        trainer.shutdown()
