"""Rule-based rewards for GRPO (format and accuracy), the plug-in loader, and the "aha" detector.

Every reward has the signature ``fn(completion, gold, choices) -> float``. The completion is what the
model wrote after the prompt, and the prompt ends in ``<think>``, so the completion starts inside the
thinking block.

The graders are pure, stdlib-only, never raise (a non-str input scores 0.0) and run in linear time:
a hung grader stalls a whole training step, so nothing here uses a regex that
can backtrack quadratically, and loops only walk over disjoint stretches of the input.

There is no symbolic math verification: the spatial answers (SAT, CV-Bench) are option texts such
as "left" or "3", and symbolic verifiers were what hung on pathological strings.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from visualthinker_ray.data.records import LETTERS  # stdlib-only, like this module
from visualthinker_ray.errors import InputError

_THINK_CLOSE = "</think>"
_ANSWER_OPEN = "<answer>"
_ANSWER_CLOSE = "</answer>"

# ---------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------

# The pattern the reference code used; kept for documentation and for the equivalence test.
FORMAT_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"

# After "</think>" a greedy \s* can only give characters back to a "<" that is never whitespace, so
# the search costs one pass plus each whitespace run once (runs after different "</think>" are
# disjoint): linear, and it uses exactly the \s of FORMAT_PATTERN.
_FORMAT_CORE = re.compile(r"</think>\s*<answer>")


def format_reward(completion: str, gold: object = None, choices: object = None) -> float:
    """1.0 iff ``"<think>" + completion`` fully matches FORMAT_PATTERN (DOTALL), else 0.0.

    ``gold`` and ``choices`` are ignored; they only let this fit the common reward signature.

    A full match exists iff the completion ends with "</answer>" and, before that closing tag,
    some "</think>" is followed by only whitespace and then "<answer>" (both ``.*?`` may hold
    anything, tags included).
    """
    if not isinstance(completion, str) or not completion.endswith(_ANSWER_CLOSE):
        return 0.0
    body_end = len(completion) - len(_ANSWER_CLOSE)
    return 1.0 if _FORMAT_CORE.search(completion, 0, body_end) is not None else 0.0


# ---------------------------------------------------------------------------------------------
# Answer extraction and normalisation
# ---------------------------------------------------------------------------------------------


def extract_answer(completion: str) -> str:
    """The stripped text inside the first complete <answer>...</answer>, else the whole completion.

    "First" means the first "<answer>" that has a "</answer>" after it, paired with the nearest
    such "</answer>" (what ``re.search(r"<answer>(.*?)</answer>", s, re.S)`` finds). A non-str
    input gives "".
    """
    if not isinstance(completion, str):
        return ""
    start = completion.find(_ANSWER_OPEN)
    if start != -1:
        end = completion.find(_ANSWER_CLOSE, start + len(_ANSWER_OPEN))
        if end != -1:
            return completion[start + len(_ANSWER_OPEN) : end].strip()
    return completion.strip()


_QUOTES = "\"'`“”‘’«»"
_TRAILING_PUNCTUATION = ".,;:!?。"


def normalize_answer(text: str) -> str:
    """Casefold, collapse whitespace, drop surrounding quotes and trailing punctuation.

    One strip per side (no loop) so that inputs like '."."."...' stay linear.
    """
    text = " ".join(text.casefold().split())
    return text.rstrip(_TRAILING_PUNCTUATION + _QUOTES + " ").lstrip(_QUOTES + " ")


# ---------------------------------------------------------------------------------------------
# Option letters
# ---------------------------------------------------------------------------------------------

# An answer that IS a letter, possibly followed by option text: "B", "b", "(B)", "[B]", "B.",
# "B)", "B:", "Option B", "(B) left", "B. left". A bare letter followed by text ("A cat ...") is
# not a letter form: that is how the article reads.
# ASCII letters only, spelled out: under re.IGNORECASE, [a-z] would also match "ſ" and the Kelvin sign.
_LETTER_FORM = re.compile(
    r"(?P<option>(?i:option|choice)\b\s*)?"
    r"(?:\((?P<paren>[A-Za-z])\)|\[(?P<bracket>[A-Za-z])\]|(?P<plain>[A-Za-z])(?P<sep>[.):])?)"
    r"(?![^\W_])"
)
# What may sit between a leading letter and the option text: "(B): left", "B) - left".
_SEPARATORS = " \t\r\n:-–—.)"


def _parse_letter_form(answer: str, n_choices: int) -> tuple[int, str] | None:
    """(option index, text after the letter) if the answer starts as a letter form, else None."""
    match = _LETTER_FORM.match(answer)
    if match is None:
        return None
    letter = (match["paren"] or match["bracket"] or match["plain"]).upper()
    rest = answer[match.end() :]
    bare = match["plain"] is not None and match["sep"] is None and match["option"] is None
    if bare and rest.strip():
        return None
    index = LETTERS.index(letter)
    if index >= n_choices:
        return None
    return index, rest.lstrip(_SEPARATORS)


# Every search below starts with a literal or a character class and checks its left context with a
# lookbehind placed AFTER that first character: a leading lookbehind would stop the regex engine from
# skipping ahead to candidate positions, which made 1 MB inputs several times slower.

# The letter is a standalone token ("B", "(B)", "B." but not "B2", "U.S.B", "X-B", "B's"): the two
# lookarounds are checked right after the letter, so the lookbehind spans the letter too.
_LETTER_LEFT = r"(?<![\w.\-'’/&].)"
_LETTER_RIGHT = r"(?![\w\-'’/&])(?!\.\w)"
# "A" followed by one of these words cannot be the article: "A or B", "A is correct".
_NOT_NOUNS = r"(?:or|and|nor|vs|versus|is|was|seems)\b"
_A_CONDITION = (
    r"(?<=(?:[^\W_]|,)[ \t]A)"  # mid-sentence, after a word: "the answer is A because ..."
    rf"|(?![ \t\r\n]+(?!{_NOT_NOUNS})\w)"  # or not followed by a word, so not the article
)
_I_CONDITION = r"(?<=[(\[]I)(?=[)\]])|(?=\))"  # "(I)", "[I]" or "I)": otherwise the pronoun


@lru_cache(maxsize=256)
def _letter_pattern(letters: str) -> re.Pattern[str]:
    """Finds any of ``letters`` used as an option letter; the match is the letter itself.

    "A" doubles as the article and "I" as the pronoun, so they count only in unambiguous spots:
    "A" unless it is followed by a word at the start of a sentence ("A cat ..."); "I" only in
    brackets or before ")".
    """
    conditions = []
    plain = letters.replace("A", "").replace("I", "")
    if plain:
        conditions.append(f"(?<=[{plain}])")
    if "A" in letters:
        conditions.append(f"(?<=A)(?:{_A_CONDITION})")
    if "I" in letters:
        conditions.append(f"(?<=I)(?:{_I_CONDITION})")
    return re.compile(f"[{letters}]{_LETTER_LEFT}{_LETTER_RIGHT}(?:{'|'.join(conditions)})")


def _option_letters(n_choices: int) -> str:
    return LETTERS[: min(n_choices, len(LETTERS))]


def _named_letters(text: str, letters: str) -> set[int]:
    """Indices of the distinct option letters in ``text``; stops once it has found two.

    One search per distinct letter instead of a scan over every match, so "B B B ..." stays in C.
    """
    found: set[int] = set()
    while letters and len(found) < 2:
        match = _letter_pattern(letters).search(text)
        if match is None:
            break
        letter = match.group()
        found.add(LETTERS.index(letter))
        letters = letters.replace(letter, "")
    return found


# ---------------------------------------------------------------------------------------------
# Option texts
# ---------------------------------------------------------------------------------------------


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


@lru_cache(maxsize=4096)
def _option_pattern(option_norm: str, ignore_case: bool) -> re.Pattern[str]:
    """Whole-word search for a normalised (non-empty) option text; any whitespace between words.

    Like a regex word boundary, one is required only where the option's own edge is a word
    character: "(3, 4)" needs none.
    """
    first, *others = option_norm.split(" ")
    head = re.escape(first)
    if _is_word_char(first[0]):
        head += rf"(?<!\w{re.escape(first)})"
    body = "".join(r"\s+" + re.escape(word) for word in others)
    tail = r"(?!\w)" if _is_word_char(option_norm[-1]) else ""
    return re.compile(head + body + tail, re.IGNORECASE if ignore_case else 0)


def _named_options(answer: str, choices: tuple[str, ...]) -> set[str]:
    """Normalised texts of the options that ``answer`` names, by whole-word text or by letter.

    Longer options are matched first and their occurrences masked, so "left of" does not also
    name "left", while "left of the box, or left" names both.
    """
    named: set[str] = set()
    text = answer.casefold()
    for key in sorted({normalize_answer(choice) for choice in choices} - {""}, key=lambda k: (-len(k), k)):
        pattern = _option_pattern(key, False)
        if pattern.search(text) is not None:
            named.add(key)
            text = pattern.sub("\x00", text)
    letters = _option_letters(len(choices))
    for index in _named_letters(_mask_lettered_options(answer, choices, letters), letters):
        named.add(normalize_answer(choices[index]))
    return named


def _mask_lettered_options(answer: str, choices: tuple[str, ...], letters: str) -> str:
    """Mask the options whose own text holds a letter token ("Box B"), so it does not name B too."""
    for choice in choices:
        key = normalize_answer(choice)
        if key and _letter_pattern(letters).search(choice) is not None:
            answer = _option_pattern(key, True).sub("\x00", answer)
    return answer


# ---------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------


def _clean_choices(choices: object) -> tuple[str, ...]:
    """Choices as a tuple of str; anything unusable becomes "" so letters stay aligned."""
    if not isinstance(choices, (list, tuple)):
        return ()
    return tuple(choice if isinstance(choice, str) else "" for choice in choices)


def _gold_option(gold: str, choices: tuple[str, ...]) -> str | None:
    """The gold option's text: gold itself, its normalised match, or the option of a gold letter."""
    if gold in choices:
        return gold
    gold_norm = normalize_answer(gold)
    for choice in choices:
        if gold_norm and normalize_answer(choice) == gold_norm:
            return choice
    parsed = _parse_letter_form(gold.strip(), len(choices))
    if parsed is not None and not parsed[1]:
        return choices[parsed[0]]
    return None


def accuracy_reward(completion: str, gold: str, choices: Sequence[str] | None = None) -> float:
    """1.0 if the answer (``extract_answer``) is right, else 0.0. Right means, in order:

    1. its normalised text equals the normalised gold (or gold option) text;
    2. with the gold among ``choices``: the answer is a letter form ("B", "(B)", "Option B", ...)
       of an option whose text is the gold text; a letter followed by text ("(B) left") also needs
       the text to be the gold text or to name only the gold option; a letter form is final;
    3. the answer names exactly one option, by whole-word option text or standalone capital
       letter, and it is the gold option. Naming several (a hedge: "A or B") scores 0.
    Free-form gold (no choices, or gold not an option) uses rule 1 only.
    """
    if not isinstance(completion, str) or not isinstance(gold, str):
        return 0.0
    answer = extract_answer(completion)
    answer_norm = normalize_answer(answer)
    if not answer_norm:  # an empty answer is never right, whatever the gold
        return 0.0
    choices = _clean_choices(choices)
    gold_text = _gold_option(gold, choices)
    gold_norm = normalize_answer(gold if gold_text is None else gold_text)
    if answer_norm in (gold_norm, normalize_answer(gold)):
        return 1.0
    if gold_text is None or not gold_norm:
        return 0.0
    return 1.0 if _names_gold(answer, gold_norm, choices) else 0.0


def _names_gold(answer: str, gold_norm: str, choices: tuple[str, ...]) -> bool:
    """Rules 2 and 3 of ``accuracy_reward``."""
    letter_form = _parse_letter_form(answer, len(choices))
    if letter_form is None:
        return _named_options(answer, choices) == {gold_norm}
    index, rest = letter_form
    if normalize_answer(choices[index]) != gold_norm:
        return False
    if not rest:
        return True
    # The text after the letter must be the gold option: named alone, or (naming no option) the
    # start of its text, as in "(B) lamp" for the option "lamp (highlighted by a red box)".
    named = _named_options(rest, choices)
    return named == {gold_norm} or (not named and _is_word_prefix(normalize_answer(rest), gold_norm))


def _is_word_prefix(prefix: str, text: str) -> bool:
    """Whether ``text`` starts with ``prefix`` and does not continue the prefix's last word."""
    if not prefix or not text.startswith(prefix):
        return False
    if len(text) == len(prefix):
        return True
    return not (_is_word_char(prefix[-1]) and _is_word_char(text[len(prefix)]))


# ---------------------------------------------------------------------------------------------
# Self-reflection ("aha moment")
# ---------------------------------------------------------------------------------------------

SELF_REFLECTION_PHRASES: tuple[str, ...] = (
    "wait",
    "but wait",
    "re-check",
    "recheck",
    "re-checked",
    "rechecked",
    "re-checking",
    "rechecking",
    "let me verify",
    "let me check",
    "double-check",
    "double check",
    "double-checked",
    "double-checking",
    "on second thought",
    "i made a mistake",
    "reconsider",
    "reconsidered",
    "reconsidering",
    "let me re-",
    "re-evaluate",
    "re-examine",
)


# The phrases as whole words (any whitespace between words) in the casefolded text; built like
# the option searches so each alternative starts with a literal.
_SELF_REFLECTION = re.compile(
    "|".join(_option_pattern(phrase, False).pattern for phrase in SELF_REFLECTION_PHRASES)
)


def self_reflection(completion: str) -> bool:
    """Whether the completion contains a self-reflection phrase (whole words, any case)."""
    return isinstance(completion, str) and _SELF_REFLECTION.search(completion.casefold()) is not None


# ---------------------------------------------------------------------------------------------
# Reward functions: built-ins, plug-ins and scoring
# ---------------------------------------------------------------------------------------------

Reward = Callable[[str, str, Sequence[str] | None], float]


@dataclass(frozen=True)
class RewardFn:
    """A named, weighted reward ``fn(completion, gold, choices) -> float``."""

    name: str
    fn: Reward
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name == "total":
            raise InputError(f"reward name must be a non-empty str other than 'total', got {self.name!r}")
        if not callable(self.fn):
            raise TypeError(f"reward {self.name!r}: fn is not callable ({type(self.fn).__name__})")
        if not _is_finite_real(self.weight):
            raise InputError(f"reward {self.name!r}: weight must be a finite number, got {self.weight!r}")


def builtin_rewards() -> dict[str, RewardFn]:
    """The reference run's rewards, weight 1 each (total at most 2.0)."""
    return {
        "format": RewardFn("format", format_reward),
        "accuracy": RewardFn("accuracy", accuracy_reward),
    }


def load_reward_fn(spec: str) -> Callable:
    """Resolve "module:function" (e.g. "visualthinker_ray.rewards:format_reward") to a callable."""
    module_name, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not module_name.strip() or not attr.strip() or ":" in attr:
        raise InputError(f"invalid reward spec {spec!r}: expected 'module:function'")
    module_name, attr = module_name.strip(), attr.strip()
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any failure inside the module's own code, not just ImportError
        raise ImportError(
            f"reward spec {spec!r}: module {module_name!r} could not be imported: {type(err).__name__}: {err}"
        ) from err
    if not hasattr(module, attr):
        available = sorted(
            name for name, value in vars(module).items() if callable(value) and not name.startswith("_")
        )
        raise AttributeError(
            f"reward spec {spec!r}: module {module_name!r} has no attribute {attr!r}; "
            f"its callables are: {', '.join(available) or '(none)'}"
        )
    fn = getattr(module, attr)
    if not callable(fn):
        raise TypeError(f"reward spec {spec!r}: {module_name}.{attr} is a {type(fn).__name__}, not callable")
    return fn


def _is_finite_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value)


def score_completion(
    completion: str, gold: str, choices: Sequence[str] | None, reward_fns: Iterable[RewardFn]
) -> dict[str, float]:
    """Each reward's raw value by name, plus "total" = the weighted sum.

    Plug-in exceptions propagate on purpose: the reward pool owns time limits and failures. A
    value that is not a finite real number raises, naming the reward.
    """
    scores: dict[str, float] = {}
    total = 0.0
    for reward in reward_fns:
        if reward.name in scores:
            raise InputError(f"duplicate reward name {reward.name!r}")
        value = reward.fn(completion, gold, choices)
        if not isinstance(value, numbers.Real):
            raise TypeError(f"reward {reward.name!r} returned {type(value).__name__}, expected a real number")
        if not math.isfinite(value):
            raise ValueError(f"reward {reward.name!r} returned {value!r}, expected a finite number")
        scores[reward.name] = float(value)
        total += reward.weight * float(value)
    scores["total"] = total
    return scores


def reward_fns_from_config(reward_cfg) -> list[RewardFn]:
    """The built-in rewards with the configured weights, then each plug-in ("module:function")."""
    fns = [
        RewardFn("format", format_reward, reward_cfg.format_weight),
        RewardFn("accuracy", accuracy_reward, reward_cfg.accuracy_weight),
    ]
    for plugin in reward_cfg.plugins:
        fns.append(RewardFn(plugin.name, load_reward_fn(plugin.function), plugin.weight))
    return fns
