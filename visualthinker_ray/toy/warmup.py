"""A short supervised warm-up that teaches a tiny random Qwen2-VL the R1-Zero FORMAT, not the task.

The paper starts GRPO from a pretrained base model (Qwen2-VL-2B) that already writes text and now and
then closes its thinking block and gives an answer, so the format and accuracy rewards have signal
from the first step. A random tiny model never writes ``</think> ... <answer>``, so it would never
earn a reward. This warm-up is the CPU stand-in for that base model: on SAT-format training records,
with the exact training prompt (``build_prompt(record, "base")`` + images), it fits completions of the
form

    " {short reasoning sentences that do not reveal the answer}</think>\\n<answer> {option}</answer>"
    + EOS

where the option is drawn UNIFORMLY (seeded) from the record's choices, independently of the gold.
The model thus learns the format and the option vocabulary (copying an option from the question)
but answers at chance: whatever accuracy GRPO adds afterwards is learned by RL from the rewards.

The reasoning texts deliberately contain NO self-reflection phrase (``rewards.self_reflection``):
any "wait" / "let me verify" that shows up during RL was not planted here, so the aha-moment signal
stays meaningful.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from visualthinker_ray.config import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from visualthinker_ray.data.records import PromptRecord
from visualthinker_ray.data.sat import join_options, lettered_variant
from visualthinker_ray.errors import InputError
from visualthinker_ray.learner.schedule import lr_factor

# Opening sentences per SAT question type. They name what to look at (question words, mostly words
# the tiny tokenizer knows, so they stay a few tokens long) and never the answer. No self-reflection
# phrase ("wait", "let me check", "verify", ...) anywhere here: see the module docstring.
REASONING_BY_TYPE: dict[str, tuple[str, ...]] = {
    "color": (
        "Let me see the color of the shape.",
        "I think about the color of this object.",
        "I see the color of the shape.",
    ),
    "shape": (
        "Let me see the shape of the object.",
        "I think about which shape it is.",
        "I see the shape of the object.",
    ),
    "count": (
        "Let me count the objects in the image.",
        "I count the number of objects.",
        "Let me count the number of objects.",
    ),
    "left_right": (
        "I compare the position of the two objects.",
        "I think about the left and right side.",
        "I see which side the object is on.",
    ),
    "above_below": (
        "I compare the position of the two objects.",
        "I think about the top and bottom.",
        "I see which object is on top.",
    ),
    "size": (
        "I compare the size of the two objects.",
        "I think about which object is bigger.",
        "I see the size of the two objects.",
    ),
    "depth": (
        "I compare how near the two objects are.",
        "I think about which object is closer.",
        "I see the two objects and the camera.",
    ),
}
# For question types without their own sentences (real SAT has many more types).
GENERIC_REASONING: tuple[str, ...] = (
    "Let me think about the image.",
    "I see the objects in the image.",
    "Let me compare the options.",
)
# Then a sentence naming the options in the order shown (reveals nothing, and puts the option texts
# right before the answer, which makes copying one of them easy to learn for a tiny model) ...
OPTION_SENTENCES: tuple[str, ...] = (
    "The options are {options}.",
    "I choose from {options}.",
)
# ... and sometimes a short closing sentence.
CLOSINGS: tuple[str, ...] = ("Then I answer.", "So I answer.")
CLOSING_PROBABILITY = 0.3


def reasoning_text(record: PromptRecord, rng: random.Random) -> str:
    """Two or three short sentences about the question; independent of the gold answer."""
    sentences = [
        rng.choice(REASONING_BY_TYPE.get(record.question_type, GENERIC_REASONING)),
        rng.choice(OPTION_SENTENCES).format(options=join_options(record.choices)),
    ]
    if rng.random() < CLOSING_PROBABILITY:
        sentences.append(rng.choice(CLOSINGS))
    return " " + " ".join(sentences)


def target_completion(
    record: PromptRecord, rng: random.Random, gold: bool = False, grounding: str | None = None
) -> str:
    """The supervised completion text (the EOS token is appended as an id, not as text).

    The answer is a uniformly random option of ``record.choices``: the format is taught, the task
    is not. The text follows the prompt's trailing "<think>", so ``format_reward`` gives it 1.0.
    ``grounding`` (the ``grounded`` warm-up): where the question's objects are, said before the
    option sentence instead of the per-type opening sentence.
    """
    if not record.choices:
        raise InputError(f"record {record.id}: the warm-up needs multiple-choice records (no choices)")
    if grounding is None:
        reasoning = reasoning_text(record, rng)
    else:
        reasoning = f" {grounding} " + rng.choice(OPTION_SENTENCES).format(
            options=join_options(record.choices)
        )
    answer = rng.choice(record.choices)  # drawn even with `gold`: both runs then see the same texts
    if gold:  # the supervised upper bound (docs/experiments/probe_learnability.py), never the RL start
        answer = record.gold
    # A space before the option: the tiny BPE only knows the option words with a leading space
    # (" purple", as the question shows them); "<answer>purple" splits into "p|ur|ple", which a tiny
    # model fails to copy. The graders strip the answer, so the space changes no reward.
    return f"{reasoning}</think>\n<answer> {answer}</answer>"


# The grounded warm-up's question kinds: every one-image SAT type and every CV-Bench task, the latter
# in CV-Bench's own wording and layout (a base model has read such questions; its answers stay random).
GROUNDED_CVBENCH_TASKS = ("Count", "Relation", "Depth", "Distance")


@dataclass(frozen=True)
class GroundedFamilies:
    """Which synthetic questions the grounded warm-up draws: SAT question types and CV-Bench tasks
    (None: all of them), and whether size/Depth pairs share one shape (``make-synthetic``'s options
    of the same names, so a warm-up can match the data RL trains and is evaluated on)."""

    question_types: tuple[str, ...] | None = None
    cvbench_tasks: tuple[str, ...] | None = None
    same_shape_sizes: bool = False

    def __post_init__(self) -> None:  # a bad family name fails where it is given, before any work
        from visualthinker_ray.toy.synthetic import SELECTABLE_QUESTION_TYPES, check_subset

        check_subset(self.question_types, SELECTABLE_QUESTION_TYPES, "grounded warm-up question_types")
        check_subset(self.cvbench_tasks, GROUNDED_CVBENCH_TASKS, "grounded warm-up cvbench_tasks")

    def kinds(self) -> tuple[str, ...]:
        from visualthinker_ray.toy.synthetic import QUESTION_TYPES

        sat_types = self.question_types or QUESTION_TYPES
        return tuple(sat_types) + tuple(self.cvbench_tasks or GROUNDED_CVBENCH_TASKS)


def grounded_example(
    rng: random.Random, image_size: int, index: int, families: GroundedFamilies = GroundedFamilies()
) -> tuple[PromptRecord, str]:
    """A fresh synthetic question (kind drawn uniformly from ``families``) as a SAT record, and its
    grounding text."""
    from visualthinker_ray.data.sat import sat_record
    from visualthinker_ray.toy.synthetic import grounding_text, make_cvbench_question, make_question, sat_row

    kind = rng.choice(families.kinds())
    cvbench = kind in GROUNDED_CVBENCH_TASKS
    make = make_cvbench_question if cvbench else make_question
    q = make(rng, kind, image_size, same_shape_sizes=families.same_shape_sizes)
    record = sat_record(sat_row(q), index, "warmup")
    return (lettered_variant(record) if cvbench else record), grounding_text(q)


def _as_shown(record: PromptRecord, rng: random.Random, lettered_fraction: float) -> PromptRecord:
    """A grounded example as shown: CV-Bench style with probability `lettered_fraction` (CV-Bench
    questions already are; the draw is made either way, so the stream of random numbers is fixed)."""
    lettered = rng.random() < lettered_fraction
    return lettered_variant(record) if lettered and "-lettered" not in record.id else record


def grounded_batch(
    rng: random.Random,
    image_size: int,
    n: int,
    first_index: int,
    lettered_fraction: float,
    gold: bool = False,
    families: GroundedFamilies = GroundedFamilies(),
) -> tuple[list[PromptRecord], list[str]]:
    """n fresh grounded examples as the warm-up shows them (``_as_shown``) and their target texts."""
    pairs = [grounded_example(rng, image_size, first_index + k, families) for k in range(n)]
    shown = [_as_shown(r, rng, lettered_fraction) for r, _ in pairs]
    return shown, [
        target_completion(r, rng, gold, grounding=g) for r, (_, g) in zip(shown, pairs, strict=True)
    ]


def _image_size(record: PromptRecord) -> int:
    """The side of a record's first image (the grounded warm-up draws its questions at the size of
    the training data's images, so they look like what RL will see)."""
    import io

    from PIL import Image

    return Image.open(io.BytesIO(record.images[0])).size[0]


def chance_accuracy(records: list[PromptRecord]) -> float:
    """Expected accuracy of a uniformly random option: mean over records of 1 / len(choices)."""
    usable = [r for r in records if r.choices]
    return sum(1.0 / len(r.choices) for r in usable) / max(1, len(usable))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WarmupSettings:
    model_dir: str
    data: str
    out_dir: str
    steps: int
    lr: float
    batch_size: int
    seed: int
    limit: int | None
    warmup_steps: int
    weight_decay: float
    min_pixels: int
    max_pixels: int
    lettered_fraction: float
    reasoning: str
    families: GroundedFamilies | None


REASONINGS = ("template", "grounded")


def _batch_order(n: int, batch_size: int, steps: int, rng: random.Random) -> list[list[int]]:
    """Record indices per step: shuffled epochs, concatenated (every record once per epoch)."""
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(n))
        rng.shuffle(epoch)
        order.extend(epoch)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def warmup(
    model_dir: str,
    data: str,
    out_dir: str,
    steps: int = 500,
    lr: float = 5e-3,
    batch_size: int = 16,
    seed: int = 0,
    limit: int | None = None,
    warmup_steps: int = 10,
    weight_decay: float = 0.0,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    lettered_fraction: float = 0.5,
    gold_answers: bool = False,
    log_every: int = 10,
    log=print,
    reasoning: str = "template",
    on_log=None,
    families: GroundedFamilies | None = None,
) -> dict:
    """Fit the format on SAT training records (``load_sat(data, "train", limit)``) and save the model.

    Loss: mean cross-entropy over the completion tokens of the batch (prompt tokens masked), AdamW,
    grad norm clipped at 1.0. Deterministic for a seed (record order, targets and dropout-free
    training all derive from it). A ``lettered_fraction`` of the examples show the question the
    CV-Bench way (``lettered_variant``), so that the evaluation's prompt layout is known too.

    ``reasoning``: ``template`` (default) writes the fixed per-type sentences of ``reasoning_text``
    on the records of ``data``. ``grounded`` is the stand-in for a base model that can SEE: every
    step draws fresh synthetic questions (``grounded_example``: SAT types and CV-Bench tasks, images
    the size of ``data``'s) and the reasoning says where the asked-about objects are
    (``synthetic.grounding_text``), still followed by a RANDOM option. It needs thousands of steps
    (the tiny model learns positions slowly) and answers at chance as well. ``families`` (grounded
    only) narrows the questions it draws to those RL will train and be evaluated on.
    ``on_log(step, model)``, if given, runs after every log line (benchmarks measure the model
    there; it must leave the model in train mode).
    ``gold_answers`` trains on the GOLD option instead: a diagnostic (how much can this model learn
    from the images when told the answer?), not a starting point for RL. Writes an HF checkpoint
    (model + processor) and ``warmup.json`` to ``out_dir``; returns that JSON's content.
    """
    from visualthinker_ray.data.sat import load_sat
    from visualthinker_ray.models import load_model, load_processor
    from visualthinker_ray.sequences import build_batch, encode_prompt

    if steps < 1 or batch_size < 1:
        raise InputError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    if not 0.0 <= lettered_fraction <= 1.0:
        raise InputError(f"lettered_fraction must be in [0, 1], got {lettered_fraction}")
    if reasoning not in REASONINGS:
        raise InputError(f"reasoning must be one of {REASONINGS}, got {reasoning!r}")
    if families is not None and reasoning != "grounded":
        raise InputError("question families narrow the grounded warm-up only: pass reasoning='grounded'")
    families = families or GroundedFamilies()
    settings = WarmupSettings(
        str(model_dir), str(data), str(out_dir), steps, lr, batch_size, seed, limit, warmup_steps,
        weight_decay, min_pixels, max_pixels, lettered_fraction, reasoning,
        families if reasoning == "grounded" else None,
    )  # fmt: skip
    t_start = time.perf_counter()
    records = [r for r in load_sat(data, "train", limit=limit).records if r.choices]
    if not records:
        raise InputError(f"no multiple-choice training records in {data}")
    processor = load_processor(str(model_dir), min_pixels, max_pixels)
    tokenizer = processor.tokenizer
    eos_id = tokenizer.eos_token_id
    image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    rng = random.Random(f"visualthinker-warmup/{seed}")

    def encode(record: PromptRecord):
        return encode_prompt(processor, record, min_pixels, max_pixels)

    if reasoning == "grounded":
        image_size = _image_size(records[0])
        chance_per_step: list[float] = []  # of the questions drawn (equal batches: their mean is exact)

        def step_inputs(step: int):
            """Fresh questions: (prompts, completion texts)."""
            shown, texts = grounded_batch(
                rng, image_size, batch_size, step * batch_size, lettered_fraction, gold_answers, families
            )
            chance_per_step.append(chance_accuracy(shown))
            return [encode(r) for r in shown], texts

        kinds = ", ".join(families.kinds())
        log(f"[warmup] grounded: fresh synthetic questions of {image_size} px every step ({kinds})")
    else:
        chance_per_step = [chance_accuracy(records)]
        encoded = [encode(r) for r in records]
        lettered = [encode(lettered_variant(r)) for r in records] if lettered_fraction > 0 else []
        log(f"[warmup] {len(records)} training records encoded in {time.perf_counter() - t_start:.1f} s")
        batches = _batch_order(len(records), batch_size, steps, rng)

        def step_inputs(step: int):
            """The step's records of `data`: (prompts, completion texts)."""
            idx = batches[step]
            texts = [target_completion(records[i], rng, gold_answers) for i in idx]
            return [lettered[i] if rng.random() < lettered_fraction else encoded[i] for i in idx], texts

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_model(str(model_dir), torch.float32, "cpu")
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, steps, max(1, warmup_steps), "cosine", floor=0.1)
        )
        losses: list[float] = []
        tokens_seen, t_train, t_log, tokens_log = 0, time.perf_counter(), time.perf_counter(), 0
        for step in range(steps):
            prompts, texts = step_inputs(step)
            completions = [tokenizer.encode(t, add_special_tokens=False) + [eos_id] for t in texts]
            batch = build_batch(prompts, completions, eos_id, image_token_id, video_token_id)
            mask = batch.pop("completion_mask")
            logits = model(**batch, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1), reduction="none"
            ).view_as(mask)
            loss = (nll * mask).sum() / mask.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            n_tokens = int(batch["attention_mask"].sum())
            tokens_seen += n_tokens
            tokens_log += n_tokens
            if (step + 1) % log_every == 0 or step + 1 == steps:
                now = time.perf_counter()
                recent = losses[-log_every:]
                log(
                    f"[warmup] step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                    f"lr {scheduler.get_last_lr()[0]:.2e}  {tokens_log / (now - t_log):.0f} tokens/s"
                )
                t_log, tokens_log = now, 0
                if on_log is not None:
                    on_log(step + 1, model)
        train_s = time.perf_counter() - t_train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    tail = losses[-min(10, len(losses)) :]
    head = losses[: min(10, len(losses))]
    summary = {
        "kind": "gold-answer-sft" if gold_answers else "format-warmup",
        "settings": asdict(settings),
        "records": len(records),
        "chance_accuracy": sum(chance_per_step) / len(chance_per_step),
        "first_loss": losses[0],
        "initial_loss": sum(head) / len(head),  # mean of the first (up to) 10 steps
        "final_loss": sum(tail) / len(tail),  # mean of the last (up to) 10 steps
        "losses": [round(x, 5) for x in losses],
        "tokens": tokens_seen,
        "train_seconds": round(train_s, 2),
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "torch_threads": torch.get_num_threads(),
    }
    (out / "warmup.json").write_text(json.dumps(summary, indent=2))
    log(
        f"[warmup] done: loss {summary['initial_loss']:.3f} -> {summary['final_loss']:.3f}, "
        f"{train_s:.1f} s training, {summary['wall_seconds']:.1f} s in all; saved to {out}"
    )
    return summary


# ---------------------------------------------------------------------------------------------
# Check
# ---------------------------------------------------------------------------------------------


def format_and_accuracy(
    model_dir: str,
    sat_source: str,
    n_prompts: int = 32,
    group_size: int = 4,
    max_new_tokens: int = 48,
    split: str = "val",
    seed: int = 0,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    prompts_per_call: int = 8,
) -> dict:
    """Sample ``group_size`` completions (temperature 1.0, HF engine) for the first ``n_prompts``
    records of a SAT split (held-out ``val`` by default) and grade them.

    Returns {"format", "accuracy" (mean rewards), "chance" (of these prompts), "option_rate" (share
    whose answer is exactly one of the options), "mixed_groups" (share of prompts whose group has
    both right and wrong answers: the groups that give GRPO a signal), "mean_tokens", "max_tokens",
    "truncated" (share that hit max_new_tokens), "completions", "prompts", "samples" (a few texts)}.
    """
    from visualthinker_ray.data.sat import load_sat
    from visualthinker_ray.rewards import accuracy_reward, extract_answer, format_reward, normalize_answer
    from visualthinker_ray.rollout.engine import SamplingSpec
    from visualthinker_ray.rollout.hf_engine import HFEngine

    records = [r for r in load_sat(sat_source, split, limit=n_prompts).records if r.choices]
    if not records:
        raise InputError(f"no multiple-choice records in {sat_source} ({split})")
    engine = HFEngine(str(model_dir), min_pixels, max_pixels, dtype="float32", device="cpu")
    fmt, acc, lengths, truncated, samples, is_option = [], [], [], 0, [], []
    mixed_groups = 0
    for start in range(0, len(records), prompts_per_call):
        chunk = records[start : start + prompts_per_call]
        spec = SamplingSpec(n=group_size, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed + start)
        group_acc: dict[str, list[float]] = {}
        for c in engine.generate(chunk, spec):
            record = chunk[[r.id for r in chunk].index(c.prompt_id)]
            fmt.append(format_reward(c.text))
            acc.append(accuracy_reward(c.text, record.gold, record.choices))
            group_acc.setdefault(c.prompt_id, []).append(acc[-1])
            options = {normalize_answer(o) for o in record.choices}
            is_option.append(normalize_answer(extract_answer(c.text)) in options)
            lengths.append(len(c.token_ids))
            truncated += c.finish_reason == "length"
            if len(samples) < 4:
                samples.append(c.text)
        mixed_groups += sum(0.0 < sum(g) < len(g) for g in group_acc.values())
    n = len(fmt)
    return {
        "format": sum(fmt) / n,
        "accuracy": sum(acc) / n,
        "chance": chance_accuracy(records),
        "option_rate": sum(is_option) / n,
        "mixed_groups": mixed_groups / len(records),
        "mean_tokens": sum(lengths) / n,
        "max_tokens": max(lengths),
        "truncated": truncated / n,
        "completions": n,
        "prompts": len(records),
        "samples": samples,
    }
