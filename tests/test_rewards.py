"""Tests for visualthinker_ray.rewards: the graders, plug-in loading, scoring and self-reflection."""

from __future__ import annotations

import math
import re
import time
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visualthinker_ray.rewards import (
    FORMAT_PATTERN,
    SELF_REFLECTION_PHRASES,
    RewardFn,
    accuracy_reward,
    builtin_rewards,
    extract_answer,
    format_reward,
    load_reward_fn,
    normalize_answer,
    score_completion,
    self_reflection,
)


def wrap(answer: str) -> str:
    """A well-formed completion (the prompt already ended in "<think>")."""
    return f"some reasoning</think>\n<answer>{answer}</answer>"


def reference_format(completion: str) -> float:
    return 1.0 if re.fullmatch(FORMAT_PATTERN, "<think>" + completion, re.DOTALL) else 0.0


# ---------------------------------------------------------------------------------------------
# format_reward
# ---------------------------------------------------------------------------------------------

FORMAT_CASES = [
    ("good", "The chair is closer.</think><answer>B</answer>", 1.0),
    ("newlines between blocks", "r</think>\n\n<answer>B</answer>", 1.0),
    ("all ascii whitespace", "r</think> \t\r\n\f\v<answer>B</answer>", 1.0),
    ("unicode whitespace is \\s", "r</think>\u2003\x1c<answer>B</answer>", 1.0),
    ("empty think and answer", "</think><answer></answer>", 1.0),
    ("whitespace-only answer", "r</think><answer> \n </answer>", 1.0),
    ("tags inside the think block", "<think>x</think>y</think><answer>B</answer>", 1.0),
    ("second answer block absorbed by .*?", "r</think><answer>B</answer><answer>C</answer>", 1.0),
    ("extra closing tag inside the answer", "r</think><answer>B</answer></answer>", 1.0),
    ("missing </think>", "reasoning<answer>B</answer>", 0.0),
    ("missing <answer>", "reasoning</think>B</answer>", 0.0),
    ("missing </answer>", "reasoning</think><answer>B", 0.0),
    ("text after </answer>", "r</think><answer>B</answer> done", 0.0),
    ("whitespace after </answer>", "r</think><answer>B</answer>\n", 0.0),
    ("text between the blocks", "r</think> so <answer>B</answer>", 0.0),
    ("answer before think", "<answer>B</answer></think>", 0.0),
    ("answer only", "<answer>B</answer>", 0.0),
    ("tags are case-sensitive", "r</think><ANSWER>B</ANSWER>", 0.0),
    ("unclosed open tag only", "r</think><answer></answer", 0.0),
    ("empty", "", 0.0),
]


@pytest.mark.parametrize(
    ("completion", "expected"), [c[1:] for c in FORMAT_CASES], ids=[c[0] for c in FORMAT_CASES]
)
def test_format_reward_table(completion: str, expected: float) -> None:
    assert format_reward(completion) == expected
    assert reference_format(completion) == expected  # the table itself agrees with the reference


def test_format_reward_counts_the_prompts_think_tag() -> None:
    completion = "reasoning</think><answer>B</answer>"
    assert re.fullmatch(FORMAT_PATTERN, completion, re.DOTALL) is None  # alone it would not match
    assert format_reward(completion) == 1.0
    # A completion that repeats the opening tag still matches: the tag sits inside the first .*?
    assert format_reward("<think>" + completion) == 1.0


def test_format_reward_ignores_gold_and_choices_and_non_str() -> None:
    assert format_reward(wrap("B"), "left", ["left", "right"]) == 1.0
    assert format_reward(None) == 0.0
    assert format_reward(b"</think><answer>B</answer>") == 0.0


TAG_SOUP = st.lists(
    st.sampled_from(
        ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "\t", "\u2003", "\x1c", "\x85"]
        + ["a", "B", "<", ">", "/", "</", "think>", "<answer", "answer>", "</answer", "é"]
    ),
    max_size=14,
).map("".join)


@given(TAG_SOUP)
@settings(max_examples=1500, deadline=None)
def test_format_reward_agrees_with_regex_fullmatch(completion: str) -> None:
    assert format_reward(completion) == reference_format(completion)


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_format_reward_agrees_with_regex_fullmatch_on_any_text(completion: str) -> None:
    assert format_reward(completion) == reference_format(completion)


# ---------------------------------------------------------------------------------------------
# extract_answer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("r</think><answer> left </answer>", "left"),
        ("<answer>B</answer> then <answer>C</answer>", "B"),
        ("<answer><answer>B</answer>", "<answer>B"),
        ("no tags at all  ", "no tags at all"),
        ("<answer>B", "<answer>B"),
        ("</answer>B<answer>", "</answer>B<answer>"),
        ("x <answer></answer>", ""),
    ],
)
def test_extract_answer(completion: str, expected: str) -> None:
    assert extract_answer(completion) == expected


@given(TAG_SOUP)
@settings(max_examples=500, deadline=None)
def test_extract_answer_agrees_with_regex_search(completion: str) -> None:
    match = re.search(r"<answer>(.*?)</answer>", completion, re.DOTALL)
    expected = match.group(1).strip() if match else completion.strip()
    assert extract_answer(completion) == expected


def test_extract_answer_non_str() -> None:
    assert extract_answer(None) == ""


# ---------------------------------------------------------------------------------------------
# accuracy_reward
# ---------------------------------------------------------------------------------------------

SPATIAL = ["left", "right", "behind"]  # gold "right" is option B
COUNTS = ["2", "12", "3"]
NESTED = ["left", "left of", "right"]
BOXES = ["Box B", "Box A"]  # letter B names "Box A", the text "Box B" must not
CVBENCH = ["lamp (highlighted by a red box)", "chair (highlighted by a blue box)"]
NINE = [f"object {i}" for i in range(10)]  # letters A..J, so "I" is a valid option letter

ACCURACY_CASES = [
    # rule 1: the text itself
    ("text", "right", "right", SPATIAL, 1.0),
    ("text case", "RIGHT", "right", SPATIAL, 1.0),
    ("text punctuation and quotes", ' "Right." ', "right", SPATIAL, 1.0),
    ("text inner whitespace", "left  \n of", "left of", NESTED, 1.0),
    ("wrong text", "left", "right", SPATIAL, 0.0),
    # rule 2: letter forms of the gold option
    ("letter", "B", "right", SPATIAL, 1.0),
    ("lowercase letter", "b", "right", SPATIAL, 1.0),
    ("parenthesised", "(B)", "right", SPATIAL, 1.0),
    ("letter dot", "B.", "right", SPATIAL, 1.0),
    ("letter paren", "B)", "right", SPATIAL, 1.0),
    ("bracketed", "[B]", "right", SPATIAL, 1.0),
    ("option letter", "Option B", "right", SPATIAL, 1.0),
    ("option letter lowercase", "option (b)", "right", SPATIAL, 1.0),
    ("paren letter with text", "(B) right", "right", SPATIAL, 1.0),
    ("dot letter with text", "B. Right.", "right", SPATIAL, 1.0),
    ("letter colon text", "B: right", "right", SPATIAL, 1.0),
    ("letter with a sentence naming the gold", "(B) it is on the right", "right", SPATIAL, 1.0),
    ("letter with the start of the option text", "(A) lamp", CVBENCH[0], CVBENCH, 1.0),
    ("letter with wrong text", "(B) left", "right", SPATIAL, 0.0),
    ("letter dot with wrong text", "B. behind", "right", SPATIAL, 0.0),
    ("wrong letter with gold text", "(A) right", "right", SPATIAL, 0.0),
    ("letter with text naming no option", "(B) is correct", "right", SPATIAL, 0.0),
    ("letter with the start of another option", "(A) chair", CVBENCH[0], CVBENCH, 0.0),
    ("letter with a cut word", "(A) lam", CVBENCH[0], CVBENCH, 0.0),
    ("wrong letter", "C", "right", SPATIAL, 0.0),
    ("wrong letter parenthesised", "(A)", "right", SPATIAL, 0.0),
    ("letter beyond the options", "(D)", "right", SPATIAL, 0.0),
    # rule 3: the answer names exactly one option
    ("sentence with the gold text", "The cup is to the right of the plate.", "right", SPATIAL, 1.0),
    ("sentence with the gold letter", "The answer is B", "right", SPATIAL, 1.0),
    ("sentence with the gold letter in parens", "So the answer is (B).", "right", SPATIAL, 1.0),
    ("letter and its own text", "B, the right one", "right", SPATIAL, 1.0),
    ("sentence with another option", "It is behind the table", "right", SPATIAL, 0.0),
    ("article A does not count", "A cat sits on the right", "right", SPATIAL, 1.0),
    ("article A is not the letter A", "A cat sits on the right", "left", SPATIAL, 0.0),
    ("article A alone names nothing", "A cat", "left", SPATIAL, 0.0),
    ("letter A at the end", "The answer is A", "left", SPATIAL, 1.0),
    ("letter A with a dot", "The answer is A.", "left", SPATIAL, 1.0),
    ("letter A before a verb", "I think A is correct", "left", SPATIAL, 1.0),
    ("letter A mid-sentence", "I pick A because it is closer", "left", SPATIAL, 1.0),
    ("letter A alone", "A", "left", SPATIAL, 1.0),
    ("letter a alone", "a", "left", SPATIAL, 1.0),
    ("letter A with paren", "A) left", "left", SPATIAL, 1.0),
    # hedges
    ("hedge letters", "A or B", "right", SPATIAL, 0.0),
    ("hedge letters gold first", "B or C", "right", SPATIAL, 0.0),
    ("hedge letters in parens", "(A) (B)", "right", SPATIAL, 0.0),
    ("hedge letters slash-free list", "B, C", "right", SPATIAL, 0.0),
    ("hedge texts", "left or right", "right", SPATIAL, 0.0),
    ("hedge text and letter", "right, or maybe C", "right", SPATIAL, 0.0),
    ("letter and another option's text", "B is behind", "right", SPATIAL, 0.0),
    # options that contain each other
    ("12 not 2", "12", "12", COUNTS, 1.0),
    ("sentence with 12", "There are 12 chairs.", "12", COUNTS, 1.0),
    ("2 is not 12", "2", "12", COUNTS, 0.0),
    ("12 does not name 2", "There are 12 chairs.", "2", COUNTS, 0.0),
    ("left of is not left", "It is left of the box", "left", NESTED, 0.0),
    ("left of names left of", "It is left of the box", "left of", NESTED, 1.0),
    ("left of and left again is a hedge", "left of the box, or just left", "left of", NESTED, 0.0),
    # option texts that hold a capital letter
    ("option text with a letter", "It is Box B", "Box B", BOXES, 1.0),
    ("another option text with a letter", "It is Box A", "Box B", BOXES, 0.0),
    ("the letter of another box", "It is B", "Box B", BOXES, 0.0),
    (
        "a capital inside a token is no letter",
        "It is behind (see figure B2, Fig. B's, the AB test, U.S.B)",
        "behind",
        SPATIAL,
        1.0,
    ),
    # "I" is a letter only where it cannot be the pronoun
    ("letter I in parens", "The answer is (I)", "object 8", NINE, 1.0),
    ("pronoun I", "I believe it is object 3", "object 3", NINE, 1.0),
    ("pronoun I is not the letter", "I believe it is C", "object 2", NINE, 1.0),
    # gold given as a letter
    ("gold (B), text answer", "right", "(B)", SPATIAL, 1.0),
    ("gold (B), letter answer", "B", "(B)", SPATIAL, 1.0),
    ("gold (B), letter form answer", "(b)", "(B)", SPATIAL, 1.0),
    ("gold (B), wrong text", "left", "(B)", SPATIAL, 0.0),
    ("gold B, sentence", "the right one", "B", SPATIAL, 1.0),
    ("gold differs only in case", "right", "Right", SPATIAL, 1.0),
    # free-form gold: rule 1 only
    ("free-form", "3.5 Meters.", "3.5 meters", None, 1.0),
    ("free-form wrong", "3.5 m", "3.5 meters", None, 0.0),
    ("free-form no partial credit", "It is 3.5 meters", "3.5 meters", None, 0.0),
    ("free-form letter means nothing", "A", "yes", None, 0.0),
    ("gold not among choices", "purple", "purple", SPATIAL, 1.0),
    ("gold not among choices, letter", "B", "purple", SPATIAL, 0.0),
    ("empty answer", "", "right", SPATIAL, 0.0),
    ("empty gold", "", "", None, 0.0),
]


@pytest.mark.parametrize(
    ("answer", "gold", "choices", "expected"),
    [c[1:] for c in ACCURACY_CASES],
    ids=[c[0] for c in ACCURACY_CASES],
)
def test_accuracy_reward_table(answer: str, gold: str, choices: list[str] | None, expected: float) -> None:
    assert accuracy_reward(wrap(answer), gold, choices) == expected


def test_accuracy_first_answer_block_counts() -> None:
    completion = "r</think><answer>B</answer> or rather <answer>C</answer>"
    assert accuracy_reward(completion, "right", SPATIAL) == 1.0
    assert accuracy_reward(completion, "behind", SPATIAL) == 0.0


def test_accuracy_without_tags_grades_the_whole_completion() -> None:
    assert accuracy_reward("It is on the right.", "right", SPATIAL) == 1.0
    assert accuracy_reward("Not left, so right.", "right", SPATIAL) == 0.0  # names two options
    assert accuracy_reward("right</think><answer>left", "right", SPATIAL) == 0.0  # unclosed tag


def test_accuracy_accepts_tuple_choices() -> None:
    assert accuracy_reward(wrap("B"), "right", tuple(SPATIAL)) == 1.0


@pytest.mark.parametrize(
    ("completion", "gold", "choices"),
    [
        (None, "right", SPATIAL),
        (wrap("right"), None, SPATIAL),
        (wrap("right"), 3, SPATIAL),
        (wrap("right"), "right", "right"),
        (wrap("right"), "right", 7),
        (wrap("B"), "right", [None, 5, "right"]),
    ],
)
def test_accuracy_odd_inputs_do_not_raise(completion: object, gold: object, choices: object) -> None:
    assert accuracy_reward(completion, gold, choices) in (0.0, 1.0)


def test_accuracy_odd_inputs_score_zero_but_valid_parts_still_count() -> None:
    assert accuracy_reward(None, "right", SPATIAL) == 0.0
    assert accuracy_reward(wrap("right"), None, SPATIAL) == 0.0
    # Non-str options keep their position, so the letter still maps to the right option.
    assert accuracy_reward(wrap("C"), "right", [None, 5, "right"]) == 1.0


ANY_TEXT = st.one_of(
    st.text(),
    st.binary().map(lambda b: b.decode("latin-1")),
    st.text(alphabet=st.characters(categories=["Cc", "Cs", "Zs", "Lu", "P"])),  # lone surrogates too
    TAG_SOUP,
)
ANY_CHOICES = st.one_of(
    st.none(),
    st.lists(st.text(max_size=12), max_size=30),
    st.lists(st.sampled_from(["A", "B", "(A)", "left", "left of", "", " ", "a"]), max_size=6),
    st.tuples(st.text(), st.integers()),
)


@given(completion=ANY_TEXT, gold=st.one_of(ANY_TEXT, st.none()), choices=ANY_CHOICES)
@settings(max_examples=400, deadline=None)
def test_accuracy_never_raises_and_is_binary(completion: str, gold: str, choices: list[str] | None) -> None:
    assert accuracy_reward(completion, gold, choices) in (0.0, 1.0)
    assert format_reward(completion) in (0.0, 1.0)
    assert isinstance(self_reflection(completion), bool)


WORDS = ["left", "right", "behind", "front", "closer", "farther", "above", "below", "chair", "lamp"]
OPTION_SETS = st.lists(st.sampled_from(WORDS), min_size=2, max_size=5, unique=True)


@given(options=OPTION_SETS, data=st.data())
@settings(max_examples=200, deadline=None)
def test_accuracy_pays_gold_text_and_letter_and_refuses_others(
    options: list[str], data: st.DataObject
) -> None:
    gold_index = data.draw(st.integers(0, len(options) - 1))
    other_index = data.draw(st.integers(0, len(options) - 1).filter(lambda i: i != gold_index))
    gold, other = options[gold_index], options[other_index]
    letter, other_letter = "ABCDE"[gold_index], "ABCDE"[other_index]
    assert accuracy_reward(wrap(gold), gold, options) == 1.0
    assert accuracy_reward(wrap(f"({letter}) {gold}"), gold, options) == 1.0
    assert accuracy_reward(wrap(f"The answer is ({letter})."), gold, options) == 1.0
    assert accuracy_reward(wrap(other), gold, options) == 0.0
    assert accuracy_reward(wrap(f"({letter}) {other}"), gold, options) == 0.0
    assert accuracy_reward(wrap(f"{gold} or {other}"), gold, options) == 0.0
    assert accuracy_reward(wrap(f"({other_letter}) or ({letter})"), gold, options) == 0.0


@given(gold=st.text(min_size=1).filter(lambda g: "answer>" not in g and normalize_answer(g)))
@settings(max_examples=200, deadline=None)
def test_accuracy_pays_the_gold_text_for_any_gold(gold: str) -> None:
    assert accuracy_reward(wrap(gold), gold, None) == 1.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [(' "Left of." ', "left of"), ("A\u2003 B", "a b"), ("...", ""), ("(A)", "(a)"), ("STRASSE", "strasse")],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


# ---------------------------------------------------------------------------------------------
# speed on adversarial inputs (a loose bound that catches quadratic behaviour, not a benchmark)
# ---------------------------------------------------------------------------------------------

MB = 1_000_000
ADVERSARIAL = {
    "close-think": "</think>" * (MB // 8),
    "open-answer": "<answer>" * (MB // 8),
    "close-think-spaces": ("</think>" + " " * 60) * (MB // 68) + "</answer>",
    "close-think-text": "</think>x" * (MB // 9) + "</answer>",
    "think-answer-pairs": "</think><answer>" * (MB // 16),
    "opens-then-closes": "<answer>" * (MB // 16) + "</answer>" * (MB // 18),
    "articles": "A cat. " * (MB // 7),
    "letters": "B " * (MB // 2),
    "letter-then-spaces": ("A" + " " * 999) * (MB // 1000),
    "word-then-spaces": "x" + " " * MB + "B",
    "nested-options": "left of " * (MB // 8),
    "near-options": "lefto " * (MB // 6),
    "punctuation": '."' * (MB // 2),
    "near-phrases": "wai " * (MB // 4),
    "unicode": "é\u2003ß\x00" * (MB // 4),
}


@pytest.mark.timeout(30)  # a quadratic grader would run for minutes: fail it instead of waiting
@pytest.mark.parametrize("text", list(ADVERSARIAL.values()), ids=list(ADVERSARIAL))
@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "in-answer"])
def test_graders_are_fast_on_adversarial_inputs(text: str, wrapped: bool) -> None:
    completion = f"</think><answer>{text}</answer>" if wrapped else text
    start = time.perf_counter()
    format_reward(completion)
    extract_answer(completion)
    accuracy_reward(completion, "left", ["left", "left of", "right", "Box B"])
    accuracy_reward(completion, "3.5 meters", None)
    self_reflection(completion)
    assert time.perf_counter() - start < 1.0


# ---------------------------------------------------------------------------------------------
# self_reflection
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("But wait! The lamp is closer.", True),
        ("Wait, let me look again.", True),
        ("WAIT", True),
        ("Let me re-check the image.", True),
        ("I rechecked the count.", True),
        ("let me verify this", True),
        ("Let\nme   check the boxes", True),
        ("I should double-check.", True),
        ("After I double-checked, B.", True),
        ("On second thought, it is B.", True),
        ("I made a mistake above.", True),
        ("Let me reconsider.", True),
        ("Let me re-examine the picture.", True),
        ("Let me re-count.", True),
        ("The chair is closer to the camera.", False),
        ("We await the result.", False),
        ("The waiter is on the left.", False),
        ("Checking the boxes, B.", False),
        ("", False),
        (None, False),
    ],
)
def test_self_reflection(text: str, expected: bool) -> None:
    assert self_reflection(text) is expected


@pytest.mark.parametrize("phrase", SELF_REFLECTION_PHRASES)
def test_every_listed_phrase_is_detected(phrase: str) -> None:
    assert self_reflection(f"So the lamp is closer. {phrase.upper()} the chair.") is True


# ---------------------------------------------------------------------------------------------
# reward functions: built-ins, plug-ins, scoring
# ---------------------------------------------------------------------------------------------


def test_builtin_rewards() -> None:
    rewards = builtin_rewards()
    assert set(rewards) == {"format", "accuracy"}
    assert all(reward.name == name and reward.weight == 1.0 for name, reward in rewards.items())
    assert rewards["format"].fn(wrap("B"), "right", SPATIAL) == 1.0
    assert rewards["accuracy"].fn(wrap("B"), "right", SPATIAL) == 1.0


def test_score_completion_sums_weighted_rewards() -> None:
    rewards = builtin_rewards()
    assert score_completion(wrap("B"), "right", SPATIAL, rewards.values()) == {
        "format": 1.0,
        "accuracy": 1.0,
        "total": 2.0,
    }
    assert score_completion("B", "right", SPATIAL, rewards.values()) == {
        "format": 0.0,
        "accuracy": 1.0,
        "total": 1.0,
    }
    weighted = [RewardFn("format", format_reward, 0.25), RewardFn("accuracy", accuracy_reward, 2.0)]
    assert score_completion(wrap("B"), "right", SPATIAL, weighted)["total"] == 2.25


def test_score_completion_passes_gold_and_choices_to_plugins() -> None:
    seen = []

    def spy(completion: str, gold: str, choices: list[str] | None) -> float:
        seen.append((completion, gold, choices))
        return True  # a bool is a real number: counts as 1.0

    scores = score_completion("c", "g", ["x"], [RewardFn("spy", spy, 0.5)])
    assert seen == [("c", "g", ["x"])]
    assert scores == {"spy": 1.0, "total": 0.5}
    assert type(scores["spy"]) is float


@pytest.mark.parametrize(
    ("value", "error"),
    [("1.0", TypeError), (None, TypeError), (1j, TypeError), (math.nan, ValueError), (math.inf, ValueError)],
)
def test_score_completion_rejects_bad_plugin_values(value: object, error: type[Exception]) -> None:
    bad = RewardFn("my_plugin", lambda completion, gold, choices: value)
    with pytest.raises(error, match="my_plugin"):
        score_completion("c", "g", None, [bad])


def test_score_completion_lets_plugin_exceptions_through() -> None:
    def broken(completion: str, gold: str, choices: list[str] | None) -> float:
        raise RuntimeError("plugin bug")

    with pytest.raises(RuntimeError, match="plugin bug"):
        score_completion("c", "g", None, [RewardFn("broken", broken)])


def test_score_completion_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match="duplicate reward name 'format'"):
        score_completion("c", "g", None, [RewardFn("format", format_reward)] * 2)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"name": "total", "fn": format_reward}, ValueError, "total"),
        ({"name": "", "fn": format_reward}, ValueError, "non-empty"),
        ({"name": "x", "fn": "format_reward"}, TypeError, "not callable"),
        ({"name": "x", "fn": format_reward, "weight": math.nan}, ValueError, "weight"),
        ({"name": "x", "fn": format_reward, "weight": "1"}, ValueError, "weight"),
    ],
)
def test_reward_fn_validates(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        RewardFn(**kwargs)


def test_reward_fn_is_frozen() -> None:
    reward = RewardFn("format", format_reward)
    with pytest.raises(AttributeError):
        reward.weight = 2.0


def test_load_builtin_by_spec() -> None:
    assert load_reward_fn("visualthinker_ray.rewards:format_reward") is format_reward
    assert load_reward_fn(" visualthinker_ray.rewards : accuracy_reward ") is accuracy_reward


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """Writes a module with the given source on sys.path and returns its (unique) name."""

    def write(source: str) -> str:
        name = f"vtr_test_plugin_{uuid.uuid4().hex}"
        (tmp_path / f"{name}.py").write_text(source)
        return name

    monkeypatch.syspath_prepend(str(tmp_path))
    return write


def test_load_user_plugin_and_score_with_it(plugin_module) -> None:
    name = plugin_module(
        "def length_bonus(completion, gold, choices):\n    return min(len(completion), 100) / 100\n"
    )
    fn = load_reward_fn(f"{name}:length_bonus")
    rewards = [*builtin_rewards().values(), RewardFn("length", fn, 0.5)]
    scores = score_completion(wrap("B"), "right", SPATIAL, rewards)
    assert scores["length"] == pytest.approx(len(wrap("B")) / 100)
    assert scores["total"] == pytest.approx(2.0 + 0.5 * len(wrap("B")) / 100)


@pytest.mark.parametrize("spec", ["no_colon", "a:b:c", ":fn", "module:", "  :  ", "", None])
def test_load_malformed_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="expected 'module:function'"):
        load_reward_fn(spec)


def test_load_missing_module_names_it() -> None:
    with pytest.raises(ImportError, match="'vtr_no_such_module_xyz' could not be imported"):
        load_reward_fn("vtr_no_such_module_xyz:fn")


def test_load_module_that_fails_on_import_names_it_and_the_cause(plugin_module) -> None:
    name = plugin_module("raise RuntimeError('boom at import')\n")
    with pytest.raises(ImportError, match=rf"'{name}' could not be imported: RuntimeError: boom at import"):
        load_reward_fn(f"{name}:fn")


def test_load_missing_attribute_lists_callables(plugin_module) -> None:
    name = plugin_module("X = 1\ndef my_reward(c, g, ch):\n    return 0.0\ndef _private():\n    pass\n")
    with pytest.raises(AttributeError, match="no attribute 'my_rewrd'") as info:
        load_reward_fn(f"{name}:my_rewrd")
    assert "its callables are: my_reward" in str(info.value)
    assert "_private" not in str(info.value)


def test_load_non_callable(plugin_module) -> None:
    name = plugin_module("THRESHOLD = 0.5\n")
    with pytest.raises(TypeError, match=rf"{name}.THRESHOLD is a float, not callable"):
        load_reward_fn(f"{name}:THRESHOLD")


def test_reward_fns_from_config_weights_and_plugins():
    from visualthinker_ray.config import load_config
    from visualthinker_ray.rewards import reward_fns_from_config

    cfg = load_config(
        None,
        [
            "reward.accuracy_weight=2.0",
            "reward.plugins=[{name: fmt_again, function: 'visualthinker_ray.rewards:format_reward', weight: 0.5}]",
        ],
    )
    fns = reward_fns_from_config(cfg.reward)
    assert [(f.name, f.weight) for f in fns] == [("format", 1.0), ("accuracy", 2.0), ("fmt_again", 0.5)]
    scores = score_completion("x</think><answer>left</answer>", "left", ["left", "right"], fns)
    assert scores["total"] == 1.0 + 2.0 + 0.5
    bad = load_config(None, ["reward.plugins=[{name: nope, function: 'no_such_module_xyz:fn'}]"])
    with pytest.raises(ImportError, match="no_such_module_xyz"):
        reward_fns_from_config(bad.reward)
