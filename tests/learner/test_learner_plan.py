"""Pure parts of the learner: batch planning across ranks, metric reduction, LR schedules."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visualthinker_ray.learner.group import PAD, plan_batch, reduce_metrics
from visualthinker_ray.learner.schedule import lr_factor


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    ranks=st.integers(1, 4),
    minis=st.integers(1, 3),
    budget=st.integers(20, 400),
    agg=st.sampled_from(["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"]),
)
def test_plan_covers_every_item_once_and_keeps_ranks_in_lockstep(data, ranks, minis, budget, agg):
    n = data.draw(st.integers(ranks * minis, 40))
    prompt = data.draw(st.lists(st.integers(1, 100), min_size=n, max_size=n))
    comp = data.draw(st.lists(st.integers(0, 100), min_size=n, max_size=n))
    plans, denoms = plan_batch(prompt, comp, ranks, minis, budget, agg)
    seen = []
    for p in plans:
        assert p.items == sorted(p.items)
        for m, mini in enumerate(p.mini_batches):
            # every rank makes the same number of forward/backward passes in each optimizer step
            assert len(mini) == len(plans[0].mini_batches[m])
            for mb in mini:
                if mb == [PAD]:
                    continue
                seen.extend(p.items[i] for i in mb)
                tokens = [prompt[p.items[i]] + comp[p.items[i]] for i in mb]
                assert len(mb) == 1 or max(tokens) * len(mb) <= budget
    assert sorted(seen) == list(range(n))
    # mini-batches are contiguous slices; the denominator is computed over the whole slice
    bounds = [round(m * n / minis) for m in range(minis + 1)]
    for m in range(minis):
        ids = range(bounds[m], bounds[m + 1])
        expected = sum(comp[i] for i in ids) if agg == "token_mean" else sum(comp[i] > 0 for i in ids)
        assert denoms[m] == max(1.0, float(expected))


def test_plan_balances_tokens_across_ranks():
    prompt = [50] * 8
    comp = [100, 10, 90, 20, 80, 30, 70, 40]
    plans, _ = plan_batch(prompt, comp, 2, 1, 10_000, "seq_mean_token_mean")
    loads = [sum(prompt[i] + comp[i] for i in p.items) for p in plans]
    assert abs(loads[0] - loads[1]) <= max(comp)


def test_plan_rejects_too_few_sequences():
    with pytest.raises(ValueError, match="cannot fill 2 mini-batch"):
        plan_batch([1, 1, 1], [1, 1, 1], 2, 2, 100, "token_mean")


def test_reduce_metrics_weights_by_sequences():
    out = reduce_metrics(
        [
            {"kl": 1.0, "sequences": 1.0, "tokens": 10, "step_s": 2.0, "grad_norm": 0.5, "lr": 1e-3},
            {"kl": 4.0, "sequences": 3.0, "tokens": 30, "step_s": 3.0, "grad_norm": 0.5, "lr": 1e-3},
        ]
    )
    assert out["kl"] == pytest.approx((1.0 * 1 + 4.0 * 3) / 4)
    assert out["tokens"] == 40 and out["sequences"] == 4.0
    assert out["step_s"] == 3.0 and out["grad_norm"] == 0.5


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_lr_schedules(kind):
    total, warm = 20, 4
    f = [lr_factor(s, total, warm, kind) for s in range(total + 1)]
    assert f[:warm] == pytest.approx([(s + 1) / warm for s in range(warm)])
    assert f[warm] == 1.0
    for s in range(warm, total + 1):
        p = (s - warm) / (total - warm)
        expected = {"constant": 1.0, "linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * p))}[kind]
        assert f[s] == pytest.approx(expected)
        # the same shape decaying to a floor instead of 0 (the toy warm-up's cosine to 10%)
        floored = lr_factor(s, total, warm, kind, floor=0.1)
        assert floored == pytest.approx(1.0 if kind == "constant" else 0.1 + 0.9 * expected)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_factor(0, 10, 0, "step")


def test_cpu_plan_picks_threads_and_cores_by_mode_and_keeps_what_is_set():
    from visualthinker_ray.learner.worker import cpu_plan

    # synchronous: generation and update take turns, the ranks share every core, unpinned
    assert cpu_plan(None, None, 0, 1, 2) == (2, None)
    assert cpu_plan(None, None, 0, 2, 8) == (4, None)
    # one-step-off beside vLLM (which binds from core 0): the upper half, pinned
    assert cpu_plan(None, None, 1, 1, 2) == (1, [1])
    assert cpu_plan(None, None, 2, 1, 8) == (4, [4, 5, 6, 7])
    assert cpu_plan(None, None, 1, 1, 1) == (1, None)  # one core: nothing to keep apart
    # several ranks pipelined: what vLLM leaves, split, unpinned
    assert cpu_plan(None, None, 1, 2, 6) == (2, None)
    # set keys win; threads never exceed the machine
    assert cpu_plan(3, None, 1, 1, 8) == (3, None)
    assert cpu_plan(None, [0], 1, 1, 2) == (1, [0])
    assert cpu_plan(16, None, 0, 1, 2) == (2, None)


def test_a_prompt_the_engine_tokenized_otherwise_is_refused_with_the_counts(tiny_model_dir, synthetic_dir):
    from visualthinker_ray.batches import TrainItem
    from visualthinker_ray.data.sat import load_sat
    from visualthinker_ray.errors import InputError
    from visualthinker_ray.learner.worker import check_prompt_len
    from visualthinker_ray.models import load_processor
    from visualthinker_ray.sequences import encode_prompt

    rec = load_sat(str(synthetic_dir / "SAT"), split="train", seed=0).records[0]
    proc = load_processor(tiny_model_dir, 28 * 28 * 4, 28 * 28 * 16)
    enc = encode_prompt(proc, rec, 28 * 28 * 4, 28 * 28 * 16)
    image_pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    check_prompt_len(enc, TrainItem(rec, [1, 2], 0.0, len(enc.input_ids)), image_pad)  # the same: passes
    wrong = TrainItem(rec, [1, 2], 0.0, len(enc.input_ids) - 12)  # an engine that made 12 image tokens fewer
    with pytest.raises(
        InputError, match=rf"engine's prompt has {len(enc.input_ids) - 12} tokens.*max_pixels"
    ):
        check_prompt_len(enc, wrong, image_pad)


def test_a_reference_loaded_in_bf16_holds_the_fp32_weights_as_the_mixed_precision_cast_makes_them(
    tiny_model_dir,
):
    """The learner stores its frozen reference in the compute dtype. FSDP2's MixedPrecisionPolicy casts
    each fp32 master parameter with .to(bfloat16) before computing; loading in bf16 must give the
    same bits, and leave the buffers (rotary frequencies) as the fp32 model has them."""
    import torch

    from visualthinker_ray.models import load_model

    fp32, bf16 = load_model(tiny_model_dir, torch.float32), load_model(tiny_model_dir, torch.bfloat16)
    params = dict(bf16.named_parameters())
    assert params.keys() == dict(fp32.named_parameters()).keys()
    for name, p in fp32.named_parameters():
        assert params[name].dtype == torch.bfloat16
        assert torch.equal(params[name], p.to(torch.bfloat16)), name
    buffers = dict(bf16.named_buffers())
    for name, b in fp32.named_buffers():
        assert buffers[name].dtype == b.dtype and torch.equal(buffers[name], b), name
