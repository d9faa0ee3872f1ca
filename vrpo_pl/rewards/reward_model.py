"""Model-based reward: a frozen Hugging Face sequence classifier, optionally checked against a verifier.

The classifier reads ``template.format(prompt=..., response=...)`` and its score is sigmoid(logit) for a one-label
head or the softmax probability of label 1 for a two-label head. A reward model that imitates a verifier
imperfectly is the "model-based noise" of method.md: pass the verifier as ``gold`` and its verdict is logged beside
the model's score, with the model's accuracy against it (``rm_accuracy``). Build one offline with
``python -m vrpo_pl.rewards.train_reward_model``.

Long inputs are truncated from the left (our choice): the response's end, where the answer is, is what matters.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vrpo_pl.models import with_pad_token
from vrpo_pl.rewards.base import Completion, RewardFunction, RewardScores
from vrpo_pl.rewards.noise import is_binary, observed_flip_rates


def check_template(owner: str, template: str) -> None:
    """Raises a ValueError unless ``template`` uses ``{response}`` and no field other than ``{prompt}``."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    if "response" not in fields or not fields <= {"prompt", "response"}:
        raise ValueError(
            f"{owner}: template={template!r} must contain {{response}} and may contain {{prompt}}, no other field "
            "(write a literal brace as {{ or }})"
        )


def classifier_probability(logits: Tensor) -> Tensor:
    """P(good) from a sequence classifier's logits.

    Args:
        logits: (B, L) with L = 1 (a single logit) or L = 2 (label 1 is "good").

    Returns:
        (B,) sigmoid(logit) for L = 1, softmax(logits)[:, 1] for L = 2.

    >>> classifier_probability(torch.tensor([[0.0], [100.0]]))
    tensor([0.5000, 1.0000])
    """
    if logits.shape[-1] == 1:
        return torch.sigmoid(logits[:, 0])
    if logits.shape[-1] == 2:
        return torch.softmax(logits, dim=-1)[:, 1]
    raise ValueError(f"classifier_probability: expected 1 or 2 labels, got logits of shape {tuple(logits.shape)}")


def reward_model_metrics(scores: Tensor, gold: Tensor, threshold: float) -> dict[str, float]:
    """How well a reward model's verdicts match the gold.

    Args:
        scores: (B,) reward-model scores in [0, 1].
        gold: (B,) gold reward (a verdict counts as positive at >= 0.5).
        threshold: Score at or above which the model's verdict is positive.

    Returns:
        ``rm_accuracy`` = mean((scores >= threshold) == (gold >= 0.5)), plus the model's observed
        ``flip_rate``/``false_positive_rate``/``false_negative_rate`` (:func:`observed_flip_rates`) when the gold is
        binary.

    >>> reward_model_metrics(torch.tensor([0.9, 0.2, 0.6]), torch.tensor([1.0, 1.0, 0.0]), 0.5)["rm_accuracy"]
    0.3333333333333333
    """
    verdicts = (scores >= threshold).double()
    metrics = {"rm_accuracy": (verdicts == (gold >= 0.5).double()).double().mean().item()}
    if is_binary(gold):
        metrics.update(observed_flip_rates(verdicts, gold))
    return metrics


class RewardModel(RewardFunction):
    """A frozen sequence classifier loaded from a local Hugging Face directory, scoring in batches."""

    def __init__(
        self,
        path: str,
        gold: RewardFunction | None = None,
        batch_size: int = 16,
        max_length: int = 512,
        binarize: bool = False,
        threshold: float = 0.5,
        template: str = "{prompt}\n{response}",
    ):
        """Builds the reward; the model loads on first use.

        Args:
            path: Local directory with the classifier (``AutoModelForSequenceClassification``, one or two labels)
                and its tokenizer, e.g. the output of ``python -m vrpo_pl.rewards.train_reward_model``.
            gold: A reward that supplies the gold signal (e.g. a NumericVerifier); its verdict is logged beside
                this model's and never trained on. None when no verifier exists.
            batch_size: Completions per forward pass.
            max_length: Tokens kept per input (truncated from the left, keeping the response's end).
            binarize: Return 0/1 verdicts (score >= threshold) instead of probabilities.
            threshold: Score at or above which a verdict is positive (for ``binarize`` and ``rm_accuracy``).
            template: How prompt and response become the classifier's input text; fields ``{prompt}`` and
                ``{response}``.
        """
        if not Path(path).is_dir():
            raise ValueError(
                f"RewardModel: path={path!r} is not a directory; give a local Hugging Face model directory (build "
                "one with `python -m vrpo_pl.rewards.train_reward_model --out DIR`)"
            )
        if gold is not None and not isinstance(gold, RewardFunction):
            raise TypeError(f"RewardModel: gold must be a RewardFunction or None (got {type(gold).__name__})")
        if batch_size < 1:
            raise ValueError(f"RewardModel: batch_size={batch_size} must be >= 1")
        if max_length < 2:
            raise ValueError(f"RewardModel: max_length={max_length} must be >= 2 (room for special tokens)")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"RewardModel: threshold={threshold} must be in [0, 1] (scores are probabilities)")
        check_template("RewardModel", template)
        self.path = path
        self.gold = gold
        self.batch_size = batch_size
        self.max_length = max_length
        self.binarize = binarize
        self.threshold = threshold
        self.template = template
        self.device = torch.device("cpu")
        self.model: Any = None
        self.tokenizer: Any = None

    def _load(self) -> None:
        """Loads tokenizer and model (frozen, eval mode) on first use."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.path)
        tokenizer.truncation_side = "left"
        model = AutoModelForSequenceClassification.from_pretrained(self.path)
        if model.config.num_labels not in (1, 2):
            raise ValueError(
                f"RewardModel: the model at path={self.path!r} has num_labels={model.config.num_labels}; a reward "
                "model needs 1 (sigmoid score) or 2 (label 1 = good)"
            )
        with_pad_token(tokenizer)  # the classifier finds each row's last token through pad_token_id: both agree
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        model.requires_grad_(False)
        self.model = model.eval().to(self.device)
        self.tokenizer = tokenizer

    def texts(self, completions: list[Completion]) -> list[str]:
        """The classifier's B input texts."""
        return [self.template.format(prompt=c.prompt, response=c.response) for c in completions]

    def probabilities(self, completions: list[Completion]) -> Tensor:
        """The model's P(good) for each completion, in batches of ``batch_size``.

        Returns:
            (B,) float32 on the CPU.
        """
        if self.model is None:
            self._load()
        texts = self.texts(completions)
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                out.append(classifier_probability(self.model(**batch).logits.float()).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, completions: list[Completion]) -> RewardScores:
        """Scores B completions with the model, and with ``gold`` when given.

        Returns:
            RewardScores: ``train`` (B,) probabilities (or 0/1 verdicts with ``binarize``); ``gold`` (B,) the gold
            reward's verdict or None; metrics ``rm_score_mean`` and, with a gold, :func:`reward_model_metrics`.
        """
        probs = self.probabilities(completions)
        train = (probs >= self.threshold).float() if self.binarize else probs
        metrics = {"rm_score_mean": probs.mean().item() if probs.numel() else 0.0}
        gold = self.gold_score(completions)
        if gold is not None and gold.numel():
            metrics.update(reward_model_metrics(probs, gold.cpu(), self.threshold))
        return RewardScores(train=train, gold=gold, metrics=metrics)

    def gold_score(self, completions: list[Completion]) -> Tensor | None:
        """The gold reward's verdict (without running the model), or None without a gold."""
        return None if self.gold is None else self.gold.gold_score(completions)

    def to(self, device: torch.device) -> RewardFunction:
        """Moves the model (now, or when it loads) and the gold reward to ``device``."""
        self.device = torch.device(device)
        if self.model is not None:
            self.model.to(self.device)
        if self.gold is not None:
            self.gold.to(device)
        return self
