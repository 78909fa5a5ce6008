"""The format warm-up: pure tests of the supervised targets, then one short real warm-up of the tiny model."""

import json
import random
import re
from collections import Counter
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from visualthinker_ray.data.records import PromptRecord
from visualthinker_ray.data.sat import load_sat
from visualthinker_ray.rewards import accuracy_reward, extract_answer, format_reward, self_reflection
from visualthinker_ray.toy import warmup as wu

# Measured (tests/toy/test_warmup.py settings, 2 shared CPU cores): format 0.95-1.0 after the short
# warm-up; the thresholds keep a margin for other seeds / torch builds.
FORMAT_THRESHOLD = 0.8


@pytest.fixture(scope="module")
def train_records(synthetic_dir):
    return load_sat(str(synthetic_dir / "SAT"), "train").records


def _record(choices, gold, question_type="color"):
    return PromptRecord(id="r", images=(b"",), question="q?", gold=gold, choices=tuple(choices),
                        question_type=question_type)  # fmt: skip


# ---------------------------------------------------------------- targets (pure)


def test_every_target_has_the_format_and_answers_one_of_the_choices(train_records):
    rng = random.Random(0)
    for _ in range(5):
        for record in train_records:
            text = wu.target_completion(record, rng)
            assert format_reward(text) == 1.0, text
            assert extract_answer(text) in record.choices, text
            # the reasoning part is closed exactly once and before the answer
            reasoning, _, rest = text.partition("</think>")
            assert "<answer>" not in reasoning and rest.startswith("\n<answer>")


def test_answers_are_uniform_over_the_options_and_ignore_the_gold():
    rng = random.Random(1)
    record = _record(["red", "green", "blue"], gold="green")
    counts = Counter(extract_answer(wu.target_completion(record, rng)) for _ in range(3000))
    assert set(counts) == {"red", "green", "blue"}
    for option in record.choices:
        assert abs(counts[option] / 3000 - 1 / 3) < 0.04, counts
    # Right answers at chance, whatever the gold's position.
    for gold in record.choices:
        rec = replace(record, gold=gold)
        right = sum(accuracy_reward(wu.target_completion(rec, rng), gold, rec.choices) for _ in range(1500))
        assert abs(right / 1500 - 1 / 3) < 0.05


def test_target_accuracy_over_a_data_set_is_the_chance_level(train_records):
    rng = random.Random(2)
    scores = [
        accuracy_reward(wu.target_completion(r, rng), r.gold, r.choices)
        for _ in range(40)
        for r in train_records
    ]
    chance = wu.chance_accuracy(train_records)
    assert abs(sum(scores) / len(scores) - chance) < 0.03


def test_reasoning_does_not_depend_on_the_gold(train_records):
    for record in train_records[:20]:
        texts = set()
        for gold in record.choices:
            texts.add(wu.reasoning_text(replace(record, gold=gold), random.Random(7)))
        assert len(texts) == 1


def test_targets_are_varied_and_deterministic_for_a_seed(train_records):
    a = [wu.target_completion(r, random.Random(3)) for r in train_records]
    b = [wu.target_completion(r, random.Random(3)) for r in train_records]
    assert a == b
    rng = random.Random(4)
    openings = {wu.target_completion(train_records[0], rng).split(".")[0] for _ in range(200)}
    assert len(openings) >= 3


def test_no_self_reflection_phrase_is_planted(train_records):
    """Reflection must emerge during RL, not come from the warm-up."""
    sentences = [s for group in wu.REASONING_BY_TYPE.values() for s in group]
    sentences += [*wu.GENERIC_REASONING, *wu.OPTION_SENTENCES, *wu.CLOSINGS]
    assert not any(self_reflection(s) for s in sentences)
    rng = random.Random(5)
    assert not any(self_reflection(wu.target_completion(r, rng)) for _ in range(10) for r in train_records)
    # the detector itself fires on such a target
    assert self_reflection(" But wait, let me check.</think>\n<answer> red</answer>")


def test_chance_accuracy_is_the_mean_inverse_option_count():
    records = [_record(["a", "b"], "a"), _record(["a", "b", "c", "d"], "a"), _record(["a", "b", "c"], "c")]
    assert wu.chance_accuracy(records) == pytest.approx((1 / 2 + 1 / 4 + 1 / 3) / 3)


def test_a_record_without_choices_is_refused():
    with pytest.raises(ValueError, match="choices"):
        wu.target_completion(_record([], "x"), random.Random(0))


def test_gold_targets_answer_the_gold_and_keep_the_random_run_texts(train_records):
    # one generator through many records, as in the warm-up loop: the gold run draws the same
    # random numbers, so every reasoning text matches the random-answer run's; only answers differ
    rng_random, rng_gold = random.Random(9), random.Random(9)
    for record in train_records[:30]:
        random_text = wu.target_completion(record, rng_random)
        gold_text = wu.target_completion(record, rng_gold, gold=True)
        assert extract_answer(gold_text) == record.gold
        assert gold_text.partition("<answer>")[0] == random_text.partition("<answer>")[0]


def test_lettered_variant_shows_the_question_the_cvbench_way(train_records):
    from visualthinker_ray.data.sat import format_sat_question
    from visualthinker_ray.evaluate import cvbench_correct

    record = train_records[0]
    bare = record.meta["raw_question"]
    # the SAT record's question is built from the bare one ...
    assert record.question == format_sat_question(bare, record.choices)
    variant = wu.lettered_variant(record)
    lines = variant.question.split("\n")
    # ... the variant is the bare question, the CV-Bench instruction, then one lettered line per option
    assert lines[0] == f"{bare} Select from the following choices."
    assert lines[1:] == [f"({'ABCD'[i]}) {c}" for i, c in enumerate(record.choices)]
    assert (variant.choices, variant.gold, variant.images) == (record.choices, record.gold, record.images)
    # a warm-up target answers it in a form the CV-Bench grader reads
    text = f" x</think>\n<answer> {record.gold}</answer>"
    assert cvbench_correct(text, variant.gold, list(variant.choices))


def test_grounded_examples_show_their_question_and_say_where_its_objects_are():
    import io

    from PIL import Image

    from visualthinker_ray.toy.synthetic import QUESTION_TYPES

    rng = random.Random(11)
    pairs = [wu.grounded_example(rng, 96, i) for i in range(400)]
    kinds = Counter(r.question_type for r, _ in pairs)
    assert set(kinds) == set(QUESTION_TYPES) | set(wu.GROUNDED_CVBENCH_TASKS)  # every kind drawn
    for record, grounding in pairs:
        assert Image.open(io.BytesIO(record.images[0])).size == (96, 96)
        lettered = record.question_type in wu.GROUNDED_CVBENCH_TASKS
        assert ("Select from the following choices." in record.question) == lettered
        # the grounding is about this question: it names what the question names
        named = re.findall(r"The (\w+ \w+) is at", grounding)
        assert all(name in record.question for name in named), (record.question, grounding)
    again = [wu.grounded_example(random.Random(11), 96, i) for i in range(1)]
    assert again[0][1] == pairs[0][1] and again[0][0].question == pairs[0][0].question


def test_grounded_families_narrow_the_questions_to_those_asked_for():
    families = wu.GroundedFamilies(("size",), ("Depth",), same_shape_sizes=True)
    rng = random.Random(13)
    pairs = [wu.grounded_example(rng, 96, i, families) for i in range(200)]
    kinds = Counter(r.question_type for r, _ in pairs)
    assert set(kinds) == {"size", "Depth"} and min(kinds.values()) > 60, kinds
    for record, grounding in pairs:
        shapes = {choice.split()[-1] for choice in record.choices}
        assert len(record.choices) == 2 and len(shapes) == 1, record.choices  # one shape, two colours
        assert re.findall(r"The (\w+ \w+) is at", grounding) == [
            c for c in re.findall(r"the (\w+ \w+)", record.meta["raw_question"]) if c in record.choices
        ]
    # without same_shape_sizes the size pairs mix shapes again
    free = [wu.grounded_example(rng, 96, i, wu.GroundedFamilies(("size",), ("Depth",))) for i in range(100)]
    assert sum(len({c.split()[-1] for c in r.choices}) == 2 for r, _ in free) > 50


@pytest.mark.parametrize(
    ("families", "reasoning", "match"),
    [
        (dict(cvbench_tasks=("Depht",)), "grounded", "cvbench_tasks"),
        (dict(question_types=()), "grounded", "question_types"),
        (dict(question_types=("size",)), "template", "reasoning='grounded'"),
    ],
)
def test_bad_grounded_families_are_refused_before_any_work(tmp_path, families, reasoning, match):
    with pytest.raises(ValueError, match=match):
        wu.warmup(
            "no-model",
            "no-data",
            str(tmp_path),
            reasoning=reasoning,
            families=wu.GroundedFamilies(**families),
        )


def test_grounded_targets_keep_the_grounding_and_answer_at_random():
    rng = random.Random(12)
    record = _record(["red circle", "blue square"], gold="red circle", question_type="size")
    grounding = "The red circle is at 1 2 size 6. The blue square is at 5 5 size 3."
    texts = [wu.target_completion(record, rng, grounding=grounding) for _ in range(2000)]
    assert all(t.startswith(f" {grounding} ") and format_reward(t) == 1.0 for t in texts)
    right = sum(accuracy_reward(t, record.gold, record.choices) for t in texts) / len(texts)
    assert abs(right - 0.5) < 0.04  # the facts say "red circle"; the answer still ignores them
    assert not any(self_reflection(t) for t in texts)


def test_lettered_variant_needs_the_raw_question():
    with pytest.raises(ValueError, match="raw_question"):
        wu.lettered_variant(_record(["a", "b"], "a"))


def test_a_bad_lettered_fraction_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="lettered_fraction"):
        wu.warmup("no-model", "no-data", str(tmp_path), lettered_fraction=1.5)


def test_an_unknown_reasoning_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="reasoning"):
        wu.warmup("no-model", "no-data", str(tmp_path), reasoning="magic")


# ---------------------------------------------------------------- a real short warm-up


@pytest.fixture(scope="module")
def warmed(tiny_model_dir, synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("warmed")
    summary = wu.warmup(
        tiny_model_dir, str(synthetic_dir / "SAT"), str(out), steps=150, lr=5e-3, batch_size=16, seed=0,
        log_every=50,
    )  # fmt: skip
    return out, summary


def test_warmup_teaches_the_format_and_answers_near_chance(warmed, synthetic_dir):
    out, summary = warmed
    check = wu.format_and_accuracy(str(out), str(synthetic_dir / "SAT"), n_prompts=16, group_size=8)
    assert check["format"] >= FORMAT_THRESHOLD, check
    assert check["truncated"] <= 0.1, check
    assert check["mean_tokens"] < 40, check
    # Near chance: neither learned (it cannot, the targets are random) nor broken (answers off the options).
    assert check["chance"] - 0.2 <= check["accuracy"] <= check["chance"] + 0.2, check
    assert check["option_rate"] >= 0.6, check


def test_the_random_model_has_no_format(tiny_model_dir, synthetic_dir):
    """The check itself: the untrained model scores 0, so the warm-up test measures the warm-up."""
    check = wu.format_and_accuracy(tiny_model_dir, str(synthetic_dir / "SAT"), n_prompts=4, group_size=4)
    assert check["format"] == 0.0


def test_warmup_loss_decreases_and_is_recorded(warmed):
    out, summary = warmed
    on_disk = json.loads((out / "warmup.json").read_text())
    assert on_disk["final_loss"] == summary["final_loss"]
    assert on_disk["settings"]["steps"] == 150 and on_disk["settings"]["seed"] == 0
    assert len(on_disk["losses"]) == 150
    assert summary["final_loss"] < 0.25 * summary["initial_loss"]
    assert summary["chance_accuracy"] == pytest.approx(0.4, abs=0.1)


def test_saved_model_loads_with_the_auto_classes_and_differs_from_the_start(warmed, tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out, _ = warmed
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
                 "generation_config.json"):  # fmt: skip
        assert (out / name).is_file(), name
    model = AutoModelForImageTextToText.from_pretrained(str(out))
    processor = AutoProcessor.from_pretrained(str(out))
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert processor.tokenizer.eos_token == "<|endoftext|>"
    before = load_file(f"{tiny_model_dir}/model.safetensors")
    after = load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_warmup_is_deterministic_for_a_seed(tiny_model_dir, synthetic_dir, tmp_path):
    data = str(synthetic_dir / "SAT")
    kw = dict(steps=3, batch_size=4, limit=8, log=lambda *_: None)
    a = wu.warmup(tiny_model_dir, data, str(tmp_path / "a"), seed=1, **kw)
    b = wu.warmup(tiny_model_dir, data, str(tmp_path / "b"), seed=1, **kw)
    c = wu.warmup(tiny_model_dir, data, str(tmp_path / "c"), seed=2, **kw)
    assert a["losses"] == b["losses"]
    assert a["losses"] != c["losses"]
    wa, wb = (
        load_file(str(tmp_path / "a" / "model.safetensors")),
        load_file(str(tmp_path / "b" / "model.safetensors")),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cli_warmup_writes_the_model_and_the_check(tiny_model_dir, synthetic_dir, tmp_path):
    from visualthinker_ray.cli import main

    out = tmp_path / "cli"
    argv = ["warmup", "--model", tiny_model_dir, "--data", str(synthetic_dir / "SAT"), "--out", str(out),
            "--steps", "2", "--batch-size", "2", "--limit", "4", "--check-prompts", "2",
            "--check-group-size", "2", "--max-new-tokens", "8"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "warmup.json").read_text())
    assert summary["settings"]["steps"] == 2
    assert set(summary["check"]) >= {"format", "accuracy", "chance", "option_rate"}
    assert (out / "model.safetensors").is_file()


def test_grounded_warmup_trains_on_fresh_questions_of_the_data_image_size(
    tiny_model_dir, synthetic_dir, tmp_path
):
    data = str(synthetic_dir / "SAT")
    lines, hooked = [], []
    kw = dict(steps=2, batch_size=3, limit=4, reasoning="grounded", log=lines.append, log_every=1)
    a = wu.warmup(tiny_model_dir, data, str(tmp_path / "a"), seed=1,
                  on_log=lambda step, model: hooked.append((step, model.training)), **kw)  # fmt: skip
    assert hooked == [(1, True), (2, True)]  # after every log line, on the model being trained
    b = wu.warmup(tiny_model_dir, data, str(tmp_path / "b"), seed=1, **kw)
    assert a["losses"] == b["losses"]  # deterministic for a seed, like the template warm-up
    assert a["settings"]["reasoning"] == "grounded"
    assert any("grounded: fresh synthetic questions of 112 px" in line for line in lines), lines
    # the chance level of the questions it drew (6 of them), not of --data's records
    assert 0.25 <= a["chance_accuracy"] <= 0.5
    template = wu.warmup(tiny_model_dir, data, str(tmp_path / "c"), seed=1, steps=2, batch_size=3, limit=4,
                         log=lambda *_: None)  # fmt: skip
    assert template["losses"] != a["losses"]


def test_cli_grounded_warmup_draws_only_the_families_given(tiny_model_dir, synthetic_dir, tmp_path, capsys):
    from visualthinker_ray.cli import main

    out = tmp_path / "narrow"
    argv = ["warmup", "--model", tiny_model_dir, "--data", str(synthetic_dir / "SAT"), "--out", str(out),
            "--reasoning", "grounded", "--question-types", "size", "--cvbench-tasks", "Depth",
            "--same-shape-sizes", "--steps", "1", "--batch-size", "2", "--limit", "4", "--check-prompts", "0"]  # fmt: skip
    assert main(argv) == 0
    settings = json.loads((out / "warmup.json").read_text())["settings"]
    assert settings["families"] == {
        "question_types": ["size"],
        "cvbench_tasks": ["Depth"],
        "same_shape_sizes": True,
    }
    assert "(size, Depth)" in capsys.readouterr().out
    # families with the template warm-up: a clear error, exit code 2, nothing written
    bad = tmp_path / "bad"
    assert main(argv[:6] + [str(bad), "--question-types", "size", "--steps", "1"]) == 2
    assert not bad.exists()
