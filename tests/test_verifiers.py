"""Answer extraction and the rule-based verifiers, on tables of free-form model outputs."""

from __future__ import annotations

import pytest
import torch

from vrpo_pl.rewards import Completion, NumericVerifier, ReasoningGymVerifier, extract_answer, parse_number
from vrpo_pl.rewards.verifiers import answers_match

LAST_NUMBER_CASES = [
    ("The sum of 3 and 4 is 7.", "7"),
    ("Let's compute: 12 - 5 = 7. So the answer is **7**", "7"),
    ("The final answer is -3", "-3"),
    ("4 - 1 - 7 = -4.", "-4"),
    ("2 - -1 = 3", "3"),
    ("12-5=7", "7"),
    ("The total cost is $3.50.", "3.50"),
    ("About 1,234 people came, not 1,000.", "1000"),
    ("There are 1,234,567 stars", "1234567"),
    ("(-3)", "-3"),
    ("It equals +5", "5"),
    ("roughly .5", ".5"),
    ("I don't know", None),
    ("", None),
    ("Step 1: add. Step 2: 40 + 2 = 42\n\nAnswer: 42", "42"),
]


@pytest.mark.parametrize(("text", "expected"), LAST_NUMBER_CASES)
def test_extract_last_number(text, expected):
    assert extract_answer(text) == expected


BOXED_CASES = [
    (r"So the answer is \boxed{42}.", "42"),
    (r"\boxed{1} first, then \boxed{ -7 }", "-7"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed {x^{2}}", "x^{2}"),
    (r"\boxed{unclosed", None),
    ("no box here, 5", None),
]


@pytest.mark.parametrize(("text", "expected"), BOXED_CASES)
def test_extract_boxed(text, expected):
    assert extract_answer(text, mode="boxed") == expected


def test_extract_regex():
    text = "Answer: A ... on reflection, Answer: C"
    assert extract_answer(text, mode="regex", pattern=r"Answer:\s*([A-D])") == "C"
    assert extract_answer(text, mode="regex", pattern=r"[A-D]$") == "C"  # no group: the whole match
    assert extract_answer("nothing", mode="regex", pattern=r"Answer: (\w)") is None
    with pytest.raises(ValueError, match="needs a pattern"):
        extract_answer(text, mode="regex")
    with pytest.raises(ValueError, match="mode='nope'"):
        extract_answer(text, mode="nope")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("7", 7.0), ("-3", -3.0), ("3.50", 3.5), ("1,234", 1234.0), ("7.", 7.0), (" 3/4 ", 0.75), ("1/0", None)]
    + [("seven", None), ("nan", None), ("inf", None), ("", None), (None, None)],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def completion(response: str, answer: str | None, **metadata) -> Completion:
    return Completion(prompt="What is it?", response=response, answer=answer, metadata=metadata)


NUMERIC_CASES = [
    ("The sum of 3 and 4 is 7.", "7", 1.0),
    ("Let's compute: 12 - 5 = 7. So the answer is **7**", "7", 1.0),
    ("The sum is 8, no wait, it is 7", "7", 1.0),
    ("The answer is 7, I think. Or 8", "7", 0.0),
    ("I don't know", "7", 0.0),
    ("4 - 1 - 7 = -4", "-4", 1.0),
    ("The answer is 4", "-4", 0.0),
    ("That makes 1,234 apples", "1234", 1.0),
    ("It costs 3.50 dollars", "3.5", 1.0),
    ("It is 7.0000001", "7", 1.0),
    ("It is 7.01", "7", 0.0),
    ("Paris is 1 city", "Paris", 0.0),
]


def test_numeric_verifier_table():
    completions = [completion(r, a) for r, a, _ in NUMERIC_CASES]
    scores = NumericVerifier().score(completions)
    expected = torch.tensor([v for _, _, v in NUMERIC_CASES])
    assert scores.train.tolist() == expected.tolist()
    assert scores.gold.tolist() == expected.tolist()
    assert scores.train.dtype == torch.float32 and scores.train.shape == (len(NUMERIC_CASES),)
    assert scores.metrics["answer_found_rate"] == pytest.approx(11 / 12)
    assert NumericVerifier().gold_score(completions).tolist() == expected.tolist()


def test_numeric_verifier_boxed_and_regex():
    boxed = NumericVerifier(extract="boxed")
    assert boxed.score([completion(r"3+4 is \boxed{7}, not 8", "7")]).train.tolist() == [1.0]
    assert boxed.score([completion("3+4 is 7", "7")]).train.tolist() == [0.0]
    regex = NumericVerifier(extract="regex", pattern=r"####\s*(\S+)")
    assert regex.score([completion("18 eggs; #### 18 then 3", "18")]).train.tolist() == [1.0]
    strings = NumericVerifier(extract="regex", pattern=r"answer is (\w+)")
    assert strings.score([completion("The answer is Paris", " Paris ")]).train.tolist() == [1.0]


def test_answers_match_tolerance():
    assert answers_match("0.3333", "1/3", tolerance=1e-3)
    assert not answers_match("0.3333", "1/3", tolerance=1e-6)
    assert not answers_match(None, "1")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tolerance": -1.0}, "tolerance=-1.0 must be >= 0"),
        ({"extract": "regex"}, "extract='regex' needs pattern"),
        ({"extract": "last_number", "pattern": "x"}, "pattern is only used with extract='regex'"),
        ({"extract": "regex", "pattern": "("}, "not a valid regular expression"),
        ({"extract": "first"}, "extract='first' must be one of"),
    ],
)
def test_numeric_verifier_rejects_bad_args(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        NumericVerifier(**kwargs)


def test_numeric_verifier_needs_reference_answer():
    with pytest.raises(ValueError, match="completion 0 has no reference answer"):
        NumericVerifier().score([completion("7", None)])


@pytest.fixture(scope="module")
def rg_entries():
    reasoning_gym = pytest.importorskip("reasoning_gym")
    chain_sum = list(reasoning_gym.create_dataset("chain_sum", size=5, seed=1))
    arithmetic = list(reasoning_gym.create_dataset("basic_arithmetic", size=3, seed=1))
    return chain_sum + arithmetic


@pytest.mark.slow  # the first test to import reasoning_gym (~2 s)
def test_reasoning_gym_verifier_table(rg_entries):
    # chain_sum seed 1: 4 - 1 - 7 = -4, 1 + 5 = 6, 57 + 87 + 70 = 214, 205 - 838 + 505 = -128, ... = 3037;
    # basic_arithmetic seed 1: 5 - 3 - 6 = -4, 2 - -1 = 3, ( 56 + -33 ) - 84 = -61.
    assert [e["answer"] for e in rg_entries] == ["-4", "6", "214", "-128", "3037", "-4", "3", "-61"]
    # (response, reasoning-gym verdict, numeric verdict)
    responses = [
        ("Let's see: 4 - 1 = 3, and 3 - 7 = -4. The final answer is -4.", 1.0, 1.0),
        ("1 + 5 = 16", 0.0, 0.0),  # reasoning-gym alone gives 0.5 partial credit ("6" is in "16")
        ("57 + 87 is 144, plus 70 gives **214**", 1.0, 1.0),
        ("The answer is 128", 0.0, 0.0),
        ("That adds up to 3,037.", 1.0, 1.0),
        ("I don't know", 0.0, 0.0),
        ("2 minus negative 1 is 3.", 1.0, 1.0),
        ("56 + -33 = 23 and 23 - 84 = -61.0", 0.0, 1.0),  # basic_arithmetic's scorer wants the exact string
    ]
    completions = [
        Completion(prompt=e["question"], response=r, answer=e["answer"], metadata={"entry": e})
        for e, (r, _, _) in zip(rg_entries, responses, strict=True)
    ]
    expected = torch.tensor([v for _, v, _ in responses])
    scores = ReasoningGymVerifier().score(completions)
    assert scores.train.tolist() == expected.tolist()
    assert scores.gold.tolist() == expected.tolist()
    assert scores.metrics["answer_found_rate"] == pytest.approx(7 / 8)
    assert NumericVerifier().score(completions).train.tolist() == [v for *_, v in responses]
    assert ReasoningGymVerifier(binary=False).score(completions[1:2]).train.tolist() == [0.5]


def test_reasoning_gym_verifier_task_from_metadata(rg_entries):
    entry = {k: v for k, v in rg_entries[1].items() if k != "metadata"}
    ok = Completion(prompt="", response="It is 6", metadata={"entry": entry, "task": "chain_sum"})
    assert ReasoningGymVerifier().score([ok]).train.tolist() == [1.0]
    with pytest.raises(ValueError, match="names no task"):
        ReasoningGymVerifier().score([Completion(prompt="", response="6", metadata={"entry": entry})])


def test_reasoning_gym_verifier_needs_entry():
    with pytest.raises(ValueError, match="needs reasoning-gym data"):
        ReasoningGymVerifier().score([completion("7", "7")])
