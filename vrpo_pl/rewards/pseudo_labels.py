"""Rule-based noisy rewards from the model's own samples: majority-vote pseudo-labels (TTRL, arXiv 2504.16084).

The rule-based noise of VRPO's sister work (DVPO, same group): no reference answer is used for training. For each
prompt, the most frequent answer extracted from its G sampled responses becomes the label, and a response earns 1
when its answer agrees with that label. Where the majority is wrong, every agreeing response is rewarded for the
wrong answer; unlike random flips, this noise is correlated with the model's own errors. The gold verifier is
scored beside it (logged, never trained on) and the share of prompts whose pseudo-label is right is logged as
``reward/pseudo_label_accuracy``.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch
from torch import Tensor

from vrpo_pl.rewards.base import Completion, RewardFunction, RewardScores
from vrpo_pl.rewards.noise import observed_flip_rates
from vrpo_pl.rewards.verifiers import (
    ExtractMode,
    NumericVerifier,
    answers_match,
    check_extract_args,
    extract_answer,
    parse_number,
)


def _canonical(answer: str) -> object:
    """Answers that mean the same number vote together ("7", "7.0", "7."); others by their stripped text."""
    number = parse_number(answer)
    return number if number is not None else answer.strip()


def majority_labels(answers: list[str | None], groups: list[object]) -> dict[object, str | None]:
    """The pseudo-label of each group: its most frequent extracted answer (ties: the one seen first); None when no
    response of the group has an answer.

    >>> majority_labels(["7", "7.0", "8", None, None], ["a", "a", "a", "b", "b"])
    {'a': '7', 'b': None}
    """
    votes: dict[object, Counter] = defaultdict(Counter)
    first: dict[object, dict[object, str]] = defaultdict(dict)
    for answer, group in zip(answers, groups, strict=True):
        votes[group]  # every group gets an entry, answered or not
        if answer is None:
            continue
        key = _canonical(answer)
        votes[group][key] += 1
        first[group].setdefault(key, answer)
    labels = {}
    for group, counter in votes.items():
        # most_common orders ties by first insertion: the answer seen first wins.
        labels[group] = first[group][counter.most_common(1)[0][0]] if counter else None
    return labels


class MajorityVote(RewardFunction):
    """1 when a response's extracted answer agrees with the majority answer of its prompt's G samples, else 0.

    Needs several samples per prompt (``--data.samples_per_prompt`` >= 2; with one, every answer is its own
    majority). Responses of the same prompt text form a group. Validation is scored by the gold verifier.
    """

    needs_groups = True

    def __init__(self, gold: RewardFunction | None = None, extract: ExtractMode = "last_number",
                 pattern: str | None = None, tolerance: float = 1e-6):
        """
        Args:
            gold: the verifier logged beside the pseudo-label reward (and used for validation); None: a
                NumericVerifier with the same extraction. Never trained on.
            extract: how answers are extracted for voting (see NumericVerifier).
            pattern: the regular expression for ``extract='regex'``.
            tolerance: numeric answers within it agree.
        """
        check_extract_args("MajorityVote", extract, pattern)
        self.gold = gold if gold is not None else NumericVerifier(extract=extract, pattern=pattern,
                                                                  tolerance=tolerance)
        if not isinstance(self.gold, RewardFunction):
            raise TypeError(f"MajorityVote: gold must be a RewardFunction (class_path + init_args), got "
                            f"{type(self.gold).__name__}")
        self.extract, self.pattern, self.tolerance = extract, pattern, tolerance

    def score(self, completions: list[Completion]) -> RewardScores:
        """Pseudo-label rewards (B,), the gold verifier's (B,), and the vote's metrics."""
        answers = [extract_answer(c.response, self.extract, self.pattern) for c in completions]
        groups = [c.prompt for c in completions]
        labels = majority_labels(answers, groups)
        train = torch.tensor([float(label is not None and answers_match(a, label, self.tolerance))
                              for a, label in zip(answers, (labels[g] for g in groups), strict=True)])
        gold_scores = self.gold.score(completions)
        gold = gold_scores.gold if gold_scores.gold is not None else gold_scores.train
        metrics = dict(gold_scores.metrics)
        metrics.update(self._vote_metrics(completions, labels, groups, train, gold))
        return RewardScores(train=train, gold=gold, metrics=metrics)

    def _vote_metrics(self, completions: list[Completion], labels: dict, groups: list, train: Tensor,
                      gold: Tensor) -> dict[str, float]:
        reference = {g: c.answer for c, g in zip(completions, groups, strict=True)}
        right = [labels[g] is not None and reference[g] is not None and answers_match(labels[g], reference[g],
                                                                                      self.tolerance)
                 for g in labels]
        metrics = {"pseudo_label_accuracy": sum(right) / len(right) if right else 0.0,
                   "pseudo_label_found_rate": sum(labels[g] is not None for g in labels) / max(len(labels), 1)}
        metrics.update(observed_flip_rates(train, gold))
        return metrics

    def gold_score(self, completions: list[Completion]) -> Tensor | None:
        return self.gold.gold_score(completions)

    def state_dict(self) -> dict:
        return {"gold": self.gold.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.gold.load_state_dict(state.get("gold", {}))

    def to(self, device: torch.device) -> RewardFunction:
        self.gold.to(device)
        return self
