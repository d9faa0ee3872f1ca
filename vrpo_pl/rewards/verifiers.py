"""Rule-based rewards: pull the final answer out of free-form text and check it.

The policy answers in sentences ("The sum of 3 and 4 is 7."), so every verifier first extracts an answer
(:func:`extract_answer`) and only then compares it with the reference. Two verifiers:

- :class:`NumericVerifier`: numeric match against ``Completion.answer`` (string match when either side is not a
  number). No extra dependency.
- :class:`ReasoningGymVerifier`: hands the extracted answer to reasoning-gym's own scorer for the completion's task,
  which knows each task's answer format.

Both are deterministic: ``train`` and ``gold`` are the same verdict, and a noise model wrapped around them
(:mod:`vrpo_pl.rewards.noise`) corrupts ``train`` only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, Literal

import torch

from vrpo_pl.rewards.base import Completion, RewardFunction, RewardScores

ExtractMode = Literal["last_number", "boxed", "regex"]
EXTRACT_MODES: tuple[str, ...] = ("last_number", "boxed", "regex")

# A number with an optional minus sign, thousands separators ("1,234") and decimals ("3.50"). The minus counts only
# when it does not follow a word character or ")": in "12-5=7" it is subtraction, in "is -3" it is a sign.
# A trailing period ("is 7.") is not part of the number because a decimal point needs a digit after it.
_NUMBER = re.compile(r"(?:(?<![\w)])[-+])?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?:(?<![\w)])-)?\.\d+")
_BOXED = re.compile(r"\\boxed\s*\{")
_FRACTION = re.compile(r"^([-+]?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)$")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, nested braces allowed; None if there is none or it never closes."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    start = starts[-1]
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
    return None


def extract_answer(text: str, mode: ExtractMode = "last_number", pattern: str | None = None) -> str | None:
    """Pulls the final answer out of a free-form response.

    Args:
        text: The response.
        mode: ``"last_number"``: the last integer or decimal ("-3", "3.50", "1,234" -> "1234"; the period of
            "is 7." is punctuation). ``"boxed"``: the content of the last ``\\boxed{...}`` (nested braces allowed).
            ``"regex"``: the first capture group of the last match of ``pattern`` (the whole match if it has no
            group).
        pattern: The regular expression for ``mode="regex"``.

    Returns:
        The answer, stripped of surrounding whitespace (and of thousands separators and a leading "+" for
        numbers), or None when nothing is found.

    Raises:
        ValueError: On an unknown mode, or ``mode="regex"`` without a pattern.

    >>> extract_answer("Let's compute: 12 - 5 = 7. So the answer is **7**.")
    '7'
    >>> extract_answer("That makes 1,234 apples in total")
    '1234'
    >>> extract_answer(r"so \\boxed{\\frac{1}{2}}", mode="boxed")
    '\\\\frac{1}{2}'
    >>> extract_answer("Answer: B", mode="regex", pattern=r"Answer:\\s*([A-D])")
    'B'
    """
    if mode == "last_number":
        matches = _NUMBER.findall(text)
        return matches[-1].replace(",", "").lstrip("+") if matches else None
    if mode == "boxed":
        return _last_boxed(text)
    if mode == "regex":
        if pattern is None:
            raise ValueError("extract_answer: mode='regex' needs a pattern; pass pattern=r'...(answer group)...'")
        matches = list(re.finditer(pattern, text))
        if not matches:
            return None
        found = matches[-1].group(1) if matches[-1].re.groups else matches[-1].group(0)
        return found.strip() if found is not None else None
    raise ValueError(f"extract_answer: mode={mode!r} must be one of {EXTRACT_MODES}")


def parse_number(s: str | None) -> float | None:
    """Reads a number written the way answers are written.

    Accepts a sign, thousands separators, decimals, a trailing period and simple fractions ("3/4").

    Args:
        s: The text, e.g. an extracted answer.

    Returns:
        The value, or None when ``s`` is None or not a finite number.

    >>> parse_number("1,234.50")
    1234.5
    >>> parse_number(" -7. ")
    -7.0
    >>> parse_number("3/4")
    0.75
    >>> parse_number("seven") is None
    True
    """
    if s is None:
        return None
    s = s.strip().replace(",", "").rstrip(".").strip()
    fraction = _FRACTION.match(s)
    if fraction:
        numerator, denominator = float(fraction.group(1)), float(fraction.group(2))
        return numerator / denominator if denominator != 0 else None
    try:
        value = float(s)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def answers_match(predicted: str | None, reference: str, tolerance: float = 1e-6) -> bool:
    """Whether an extracted answer equals the reference.

    Args:
        predicted: The extracted answer (None when extraction found nothing).
        reference: The reference answer.
        tolerance: Largest absolute difference counted as equal when both sides are numbers.

    Returns:
        Numeric equality within ``tolerance`` when both parse as numbers, else equality of the stripped strings;
        always False for ``predicted=None``.

    >>> answers_match("7.0", "7"), answers_match("-4", "4"), answers_match(" Paris", "Paris")
    (True, False, True)
    """
    if predicted is None:
        return False
    a, b = parse_number(predicted), parse_number(reference)
    if a is not None and b is not None:
        return abs(a - b) <= tolerance
    return predicted.strip() == reference.strip()


def check_extract_args(owner: str, extract: str, pattern: str | None) -> None:
    """Validates the ``extract``/``pattern`` pair of a verifier at construction.

    Raises:
        ValueError: With ``owner`` in the message, on an unknown mode, a regex mode without a pattern, a pattern
            given to a non-regex mode, or a pattern that does not compile.
    """
    if extract not in EXTRACT_MODES:
        raise ValueError(f"{owner}: extract={extract!r} must be one of {EXTRACT_MODES}")
    if extract == "regex":
        if pattern is None:
            raise ValueError(
                f"{owner}: extract='regex' needs pattern=r'...(answer)...' (the first group is the answer)"
            )
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{owner}: pattern={pattern!r} is not a valid regular expression ({err})") from err
    elif pattern is not None:
        raise ValueError(f"{owner}: pattern is only used with extract='regex' (got extract={extract!r}); drop it")


def _verdicts(values: list[float], found: list[bool]) -> RewardScores:
    """Packs per-completion verdicts: train == gold, plus the fraction of responses where an answer was found."""
    train = torch.tensor(values, dtype=torch.float32)
    found_rate = sum(found) / len(found) if found else 0.0
    return RewardScores(train=train, gold=train.clone(), metrics={"answer_found_rate": found_rate})


class NumericVerifier(RewardFunction):
    """1 when the extracted answer equals the reference answer (numerically when both are numbers), else 0."""

    needs_answers = True
    """Every completion must carry its reference answer (checked against the data at start)."""

    def __init__(self, extract: ExtractMode = "last_number", pattern: str | None = None, tolerance: float = 1e-6):
        """Builds the verifier.

        Args:
            extract: How to find the answer in the response: ``last_number`` (last integer or decimal),
                ``boxed`` (last ``\\boxed{...}``) or ``regex`` (first group of the last match of ``pattern``).
            pattern: Regular expression for ``extract=regex``; must be left out otherwise.
            tolerance: Largest absolute difference between two numeric answers that still counts as equal.
        """
        check_extract_args("NumericVerifier", extract, pattern)
        if not tolerance >= 0:
            raise ValueError(f"NumericVerifier: tolerance={tolerance} must be >= 0 (1e-6 suits integer answers)")
        self.extract = extract
        self.pattern = pattern
        self.tolerance = tolerance

    def score(self, completions: list[Completion]) -> RewardScores:
        """Scores B completions against ``Completion.answer``.

        Returns:
            RewardScores with ``train`` and ``gold`` of shape (B,) in {0, 1}, metric ``answer_found_rate``.

        Raises:
            ValueError: When a completion has no reference answer.
        """
        values, found = [], []
        for i, completion in enumerate(completions):
            if completion.answer is None:
                raise ValueError(
                    f"NumericVerifier: completion {i} has no reference answer (Completion.answer is None); "
                    "use a data set with answers, or a RewardModel for open-ended prompts"
                )
            predicted = extract_answer(completion.response, self.extract, self.pattern)
            found.append(predicted is not None)
            values.append(float(answers_match(predicted, completion.answer, self.tolerance)))
        return _verdicts(values, found)


class ReasoningGymVerifier(RewardFunction):
    """Scores the extracted answer with reasoning-gym's own scorer for the completion's task.

    Needs the reasoning-gym entry in ``Completion.metadata["entry"]`` (its ``metadata["source_dataset"]``, or else
    ``Completion.metadata["task"]``, names the task). Scorers are built once per task and cached.
    """

    def __init__(self, extract: ExtractMode = "last_number", pattern: str | None = None, binary: bool = True):
        """Builds the verifier.

        Args:
            extract: How to find the answer in the response: ``last_number`` (last integer or decimal),
                ``boxed`` (last ``\\boxed{...}``) or ``regex`` (first group of the last match of ``pattern``).
            pattern: Regular expression for ``extract=regex``; must be left out otherwise.
            binary: Reward 1 only for the scorer's full credit and 0 otherwise. reasoning-gym gives partial
                credit when the reference is a substring of the answer ("16" for "6" scores 0.5), which would pay
                wrong answers; ``false`` keeps the scorer's value in [0, 1] (our choice: binary by default).
        """
        check_extract_args("ReasoningGymVerifier", extract, pattern)
        self.extract = extract
        self.pattern = pattern
        self.binary = binary
        self._scorers: dict[str, Callable[..., float]] = {}

    def _scorer(self, task: str) -> Callable[..., float]:
        """reasoning-gym's ``score_answer(answer, entry)`` for ``task``, built on first use."""
        if task not in self._scorers:
            import reasoning_gym  # lazy: importing it costs ~2 s

            self._scorers[task] = reasoning_gym.get_score_answer_fn(task)
        return self._scorers[task]

    def score(self, completions: list[Completion]) -> RewardScores:
        """Scores B completions.

        Returns:
            RewardScores with ``train`` and ``gold`` of shape (B,) in [0, 1] ({0, 1} when ``binary``), metric
            ``answer_found_rate``. An answer that cannot be extracted scores 0.

        Raises:
            ValueError: When a completion carries no reasoning-gym entry or no task name.
        """
        values, found = [], []
        for i, completion in enumerate(completions):
            entry = completion.metadata.get("entry")
            if entry is None:
                raise ValueError(
                    f"ReasoningGymVerifier: completion {i} has no reasoning-gym entry in metadata['entry']; this "
                    "verifier needs reasoning-gym data (use NumericVerifier for other data sets)"
                )
            task = _task_name(entry, completion.metadata)
            if task is None:
                raise ValueError(
                    f"ReasoningGymVerifier: completion {i} names no task (neither entry['metadata']"
                    "['source_dataset'] nor metadata['task'] is set)"
                )
            predicted = extract_answer(completion.response, self.extract, self.pattern)
            found.append(predicted is not None)
            value = 0.0 if predicted is None else float(self._scorer(task)(answer=predicted, entry=entry))
            values.append(float(value >= 1.0) if self.binary else value)
        return _verdicts(values, found)


def _task_name(entry: dict[str, Any], metadata: dict[str, Any]) -> str | None:
    """The reasoning-gym task of an entry: its ``source_dataset``, else the data module's ``task``."""
    entry_metadata = entry.get("metadata")
    if isinstance(entry_metadata, dict) and entry_metadata.get("source_dataset"):
        return str(entry_metadata["source_dataset"])
    task = metadata.get("task")
    return str(task) if task else None
