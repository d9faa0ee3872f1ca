"""The model-based reward and its offline training, on a tiny random BERT built in tmp_path (no download)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from vrpo_pl.rewards import Completion, NumericVerifier, RewardFunction, RewardModel
from vrpo_pl.rewards.reward_model import classifier_probability, reward_model_metrics
from vrpo_pl.rewards.train_reward_model import (
    balanced_pos_weight,
    train_classifier,
    train_reward_model,
)

WORDS = "the answer is it right wrong sum of and so i don ' t know state final to following arithmetic problem"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS.split(), *"0123456789", *[f"##{d}" for d in range(10)]]
VOCAB += [".", ",", ":", "+", "-", "=", "*"]


def save_tiny_bert(path, num_labels: int = 1, seed: int = 0):
    """A 1-layer, 16-wide BertForSequenceClassification and its WordPiece tokenizer, saved to ``path``."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    # transformers 5: BertTokenizer(vocab_file=...) silently builds an empty vocabulary; vocab= takes a dict.
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(VOCAB)})
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers.utils import logging

    logging.disable_progress_bar()
    return str(save_tiny_bert(tmp_path_factory.mktemp("tiny_bert")))


def sums(n: int) -> list[Completion]:
    """n completions of varying length for "a + b =", every other one right."""
    out = []
    for i in range(n):
        a, b = i % 10, (3 * i) % 10
        said = a + b if i % 2 == 0 else a + b + 1
        response = f"the sum of {a} and {b} is {said}." + " so it is right" * (i % 4)
        out.append(Completion(prompt=f"{a} + {b} =", response=response, answer=str(a + b)))
    return out


def test_classifier_probability():
    assert torch.allclose(classifier_probability(torch.tensor([[0.0], [2.0]])), torch.sigmoid(torch.tensor([0.0, 2.0])))
    two = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    assert torch.allclose(classifier_probability(two), torch.softmax(two, -1)[:, 1])
    with pytest.raises(ValueError, match="1 or 2 labels"):
        classifier_probability(torch.zeros(2, 3))


def test_reward_model_metrics_by_hand():
    metrics = reward_model_metrics(torch.tensor([0.9, 0.2, 0.6, 0.4]), torch.tensor([1.0, 1.0, 0.0, 0.0]), 0.5)
    assert metrics == pytest.approx(
        {"rm_accuracy": 0.5, "flip_rate": 0.5, "false_positive_rate": 0.5, "false_negative_rate": 0.5}
    )
    assert reward_model_metrics(torch.tensor([0.9, 0.2]), torch.tensor([1.0, 0.0]), 0.95)["rm_accuracy"] == 0.5


def test_scores_shape_range_and_batching(tiny_bert):
    completions = sums(11)
    one_batch = RewardModel(tiny_bert, batch_size=16)
    assert one_batch.model is None  # loads lazily
    scores = one_batch.score(completions)
    assert scores.train.shape == (11,) and scores.train.dtype == torch.float32
    assert ((scores.train > 0) & (scores.train < 1)).all()
    assert scores.gold is None and set(scores.metrics) == {"rm_score_mean"}
    assert not any(p.requires_grad for p in one_batch.model.parameters()) and not one_batch.model.training
    batched = RewardModel(tiny_bert, batch_size=3).score(completions).train
    assert torch.allclose(batched, scores.train, atol=1e-5)  # padding does not change a score
    assert RewardModel(tiny_bert).score([]).train.shape == (0,)


def test_two_label_head_uses_label_one(tmp_path):
    path = str(save_tiny_bert(tmp_path, num_labels=2))
    reward = RewardModel(path, template="{response}")
    completions = sums(4)
    probs = reward.score(completions).train
    batch = reward.tokenizer([c.response for c in completions], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(reward.model(**batch).logits, -1)[:, 1]
    assert torch.allclose(probs, expected, atol=1e-6)


def test_gold_metric_and_binarize(tiny_bert):
    completions = sums(10)
    gold = NumericVerifier().score(completions).gold
    assert gold.tolist() == [1.0, 0.0] * 5
    reward = RewardModel(tiny_bert, gold=NumericVerifier(), binarize=True, threshold=0.5)
    assert torch.equal(reward.gold_score(completions), gold) and reward.model is None  # gold needs no forward
    scores = reward.score(completions)
    assert set(scores.train.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(scores.gold, gold)
    assert scores.metrics["rm_accuracy"] == pytest.approx((scores.train == gold).float().mean().item())
    assert 0 < scores.metrics["rm_score_mean"] < 1 and "false_positive_rate" in scores.metrics
    assert reward.to(torch.device("cpu")) is reward and reward.model.device.type == "cpu"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"path": "/no/such/model"}, ValueError, "path='/no/such/model' is not a directory"),
        ({"batch_size": 0}, ValueError, "batch_size=0 must be >= 1"),
        ({"max_length": 1}, ValueError, "max_length=1"),
        ({"threshold": 1.5}, ValueError, r"threshold=1.5 must be in \[0, 1\]"),
        ({"template": "{prompt} only"}, ValueError, "must contain {response}"),
        ({"template": "{prompt} {response} {answer}"}, ValueError, "no other field"),
        ({"gold": "NumericVerifier"}, TypeError, "gold must be a RewardFunction"),
    ],
)
def test_bad_arguments_fail_at_construction(tiny_bert, kwargs, error, message):
    with pytest.raises(error, match=message):
        RewardModel(**{"path": tiny_bert, **kwargs})


def test_built_from_yaml_with_jsonargparse(tiny_bert):
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--reward", type=RewardFunction)
    config = parser.parse_string(
        f"reward:\n  class_path: vrpo_pl.rewards.RewardModel\n  init_args:\n    path: {tiny_bert}\n"
        "    batch_size: 4\n    gold: {class_path: vrpo_pl.rewards.NumericVerifier}\n"
    )
    reward = parser.instantiate(config).reward
    assert isinstance(reward, RewardModel) and isinstance(reward.gold, NumericVerifier) and reward.batch_size == 4


def test_balanced_pos_weight():
    assert balanced_pos_weight(torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])).item() == 2.0
    assert balanced_pos_weight(torch.tensor([1.0, 1.0])).item() == 1.0


def test_train_classifier_learns_a_separable_task(tiny_bert):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = [f"the answer is {'right' if i % 3 == 0 else 'wrong'} {i % 10}" for i in range(24)]
    labels = torch.tensor([float(i % 3 == 0) for i in range(24)])
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    torch.manual_seed(0)  # dropout
    losses = train_classifier(model, tokenizer, texts, labels, epochs=8, lr=1e-2, batch_size=8)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits[:, 0]
    assert ((logits > 0).float() == labels).all()


def fake_sampler(prompts: list[str]) -> list[str]:
    """Answers chain_sum questions, right on even positions and off by one on odd ones."""
    responses = []
    for i, prompt in enumerate(prompts):
        expression = re.search(r":\s*(.*?)\s*=\s*$", prompt).group(1)
        terms = expression.replace("- ", "-").replace("+ ", "").split()
        total = sum(int(t) for t in terms) + (i % 2)
        responses.append(f"The final answer is {total}.")
    return responses


@pytest.mark.slow  # samples nothing real, but builds prompts, trains, saves and reloads a model (~2 s)
def test_train_reward_model_end_to_end(tiny_bert, tmp_path):
    out = tmp_path / "rm"
    common = {"num_labelled": 16, "num_test": 8, "backbone": tiny_bert, "epochs": 2, "max_length": 64}
    report = train_reward_model(out, sampler=fake_sampler, **common)
    assert report["num_train"] == 16 and report["num_test"] == 8
    assert report["train_positive_rate"] == 0.5 and report["test_positive_rate"] == 0.5
    assert 0 <= report["accuracy"] <= 1 and len(report["epoch_losses"]) == 2
    saved = json.loads((out / "report.json").read_text())
    assert saved["accuracy"] == report["accuracy"] and saved["task_kwargs"] == report["task_kwargs"]
    assert len((out / "completions.jsonl").read_text().splitlines()) == 24
    reloaded = RewardModel(str(out), gold=NumericVerifier(), max_length=64)
    completions = [Completion(**json.loads(line)) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert reloaded.score(completions[16:]).metrics["rm_accuracy"] == pytest.approx(report["accuracy"])
    again = train_reward_model(tmp_path / "again", completions_file=out / "completions.jsonl", **common)
    assert again["accuracy"] == pytest.approx(report["accuracy"])  # same data and seed: same model


def test_report_warns_when_the_reward_model_is_no_better_than_chance():
    from vrpo_pl.rewards.train_reward_model import format_report

    report = {"task": "chain_sum", "task_kwargs": {}, "num_train": 256, "train_positive_rate": 0.12, "num_test": 128,
              "test_positive_rate": 0.15, "accuracy": 0.69, "majority_baseline": 0.85, "balanced_accuracy": 0.43,
              "false_positive_rate": 0.20, "false_negative_rate": 0.95, "youden_j": -0.149, "seconds_sampling": 1.0,
              "seconds_training": 1.0, "seconds_total": 2.0}
    text = format_report(report)
    assert "warning: Youden's J -0.149 <= 0" in text and "--epochs" in text and "--completions" in text
    assert "warning" not in format_report({**report, "youden_j": 0.162})
