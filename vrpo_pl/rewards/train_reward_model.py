"""Train an imperfect reward model offline: a classifier that imitates the verifier from a few labelled samples.

This builds the "model-based noise" of method.md. Steps:

1. sample one response per reasoning-gym prompt from SmolLM2-135M-Instruct (chat template, temperature 1.0);
2. label every response with :class:`~vrpo_pl.rewards.verifiers.NumericVerifier` (the gold);
3. fine-tune all-MiniLM-L6-v2 with a one-logit head (BCE with logits) on ``num_labelled`` of them, the positive
   class re-weighted to balance the classes (our choice: sampled at temperature 1.0, SmolLM2 is right on only
   ~16-21% of 2-term 1-digit chain_sum prompts, and an unweighted classifier drifts toward "always wrong");
4. measure its accuracy against the verifier on ``num_test`` held-out prompts, loading the saved directory through
   :class:`~vrpo_pl.rewards.reward_model.RewardModel` exactly as training will;
5. save model, tokenizer, ``completions.jsonl`` and ``report.json`` to ``--out``.

Measured (seed 0, 256 train / 128 test, 4 epochs): accuracy 0.727 against the verifier (majority baseline 0.789),
false-positive rate 0.24, false-negative rate 0.41, Youden's J 0.36 (balanced accuracy 0.68): a noisy but
informative reward. Adding "The final answer is X." pairs (reference and a near miss) to the training set raised raw
accuracy to 0.77 but lowered J to 0.17, so it is not offered. Sampling dominates the time (384 x 48 tokens).

Run::

    python -m vrpo_pl.rewards.train_reward_model --task chain_sum --num-labelled 256 --out runs/rm_chain_sum

Then plug it in with ``RewardModel(path=runs/rm_chain_sum, gold=NumericVerifier())``. The report's
false-positive/false-negative rates are the estimates :class:`~vrpo_pl.rewards.noise.FlipRateCorrection` needs
(with ``binarize: true``). Nothing is downloaded: both models come from registry packages (:mod:`vrpo_pl.hub`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vrpo_pl.models import with_pad_token
from vrpo_pl.rewards.base import Completion
from vrpo_pl.rewards.reward_model import RewardModel
from vrpo_pl.rewards.verifiers import NumericVerifier

Sampler = Callable[[list[str]], list[str]]
"""Maps B prompts (plain questions, before any chat template) to B sampled responses."""

# SmolLM2-135M is right ~45% of the time (greedy; ~20% sampled at temperature 1) on 2-term 1-digit chain_sum and
# ~0% at reasoning-gym's defaults (2-6 terms of 1-4 digits), which would leave almost no positive labels.
DEFAULT_TASK_KWARGS: dict[str, dict[str, Any]] = {
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
}


class SmolLMSampler:
    """Samples responses from a local causal LM with its chat template (default: SmolLM2-135M-Instruct)."""

    def __init__(
        self,
        path: str | Path | None = None,
        batch_size: int = 16,
        max_new_tokens: int = 48,
        temperature: float = 1.0,
        seed: int = 0,
        verbose: bool = False,
    ):
        """Loads the model.

        Args:
            path: Local Hugging Face directory; None uses :func:`vrpo_pl.hub.smollm2_path`.
            batch_size: Prompts per ``generate`` call (left-padded).
            max_new_tokens: Tokens sampled per response.
            temperature: Sampling temperature (pure sampling: no top-k, no top-p).
            seed: Seed of the global torch generator before sampling starts.
            verbose: Print progress to stderr after each batch.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from vrpo_pl import hub

        path = hub.smollm2_path() if path is None else path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        with_pad_token(self.tokenizer)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.verbose = verbose

    def __call__(self, prompts: list[str]) -> list[str]:
        """Samples one response per prompt; returns the B decoded responses (special tokens removed)."""
        torch.manual_seed(self.seed)
        started = time.perf_counter()
        responses = []
        for start in range(0, len(prompts), self.batch_size):
            chats = [[{"role": "user", "content": p}] for p in prompts[start : start + self.batch_size]]
            texts = self.tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = self.model.generate(
                    **batch,
                    do_sample=True,
                    temperature=self.temperature,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            responses += self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            if self.verbose:
                elapsed = time.perf_counter() - started
                print(f"sampled {len(responses)}/{len(prompts)} ({elapsed:.0f} s)", file=sys.stderr, flush=True)
        return responses


def task_entries(task: str, n: int, seed: int, task_kwargs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """n reasoning-gym entries (question, answer, metadata), built offline.

    Args:
        task: reasoning-gym task name, e.g. ``chain_sum``.
        n: Number of entries.
        seed: Data set seed.
        task_kwargs: The task's config arguments; None uses :data:`DEFAULT_TASK_KWARGS` (empty for most tasks).
    """
    import reasoning_gym

    kwargs = DEFAULT_TASK_KWARGS.get(task, {}) if task_kwargs is None else task_kwargs
    return list(reasoning_gym.create_dataset(task, size=n, seed=seed, **kwargs))


def to_completions(entries: Sequence[dict[str, Any]], responses: Sequence[str], task: str) -> list[Completion]:
    """Pairs entries with their responses the way the data module does (entry and task in the metadata)."""
    return [
        Completion(prompt=e["question"], response=r, answer=str(e["answer"]), metadata={"entry": e, "task": task})
        for e, r in zip(entries, responses, strict=True)
    ]


def balanced_pos_weight(labels: Tensor) -> Tensor:
    """BCE positive-class weight n_neg / n_pos, so both classes weigh the same in the loss.

    Args:
        labels: (N,) binary labels.

    Returns:
        A scalar tensor; 1 when either class is absent.

    >>> balanced_pos_weight(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    tensor(3.)
    """
    n_pos = labels.sum()
    n_neg = labels.numel() - n_pos
    return n_neg / n_pos if n_pos > 0 and n_neg > 0 else torch.tensor(1.0)


def train_classifier(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    labels: Tensor,
    epochs: int = 4,
    lr: float = 5e-5,
    batch_size: int = 16,
    max_length: int = 128,
    balance: bool = True,
    seed: int = 0,
) -> list[float]:
    """Fine-tunes a one-logit sequence classifier with BCE-with-logits, all weights trainable.

    Args:
        model: A ``*ForSequenceClassification`` with ``num_labels=1``; trained in place, left in eval mode.
        tokenizer: Its tokenizer (truncating from the left, as :class:`RewardModel` does).
        texts: N input texts.
        labels: (N,) binary labels.
        epochs: Passes over the data.
        lr: AdamW learning rate (weight decay 0.01).
        batch_size: Texts per step.
        max_length: Tokens kept per text.
        balance: Weight the positive class by n_neg / n_pos (:func:`balanced_pos_weight`).
        seed: Seed of the shuffling.

    Returns:
        The mean loss of each epoch.
    """
    generator = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=balanced_pos_weight(labels) if balance else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    epoch_losses = []
    for _ in range(epochs):
        order = torch.randperm(len(texts), generator=generator)
        losses = []
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            loss = loss_fn(model(**batch).logits[:, 0], labels[idx].float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))
    model.eval()
    return epoch_losses


def train_reward_model(
    out: str | Path,
    task: str = "chain_sum",
    task_kwargs: dict[str, Any] | None = None,
    num_labelled: int = 256,
    num_test: int = 128,
    sampler: Sampler | None = None,
    backbone: str | Path | None = None,
    epochs: int = 4,
    lr: float = 5e-5,
    batch_size: int = 16,
    max_length: int = 128,
    balance: bool = True,
    template: str = "{prompt}\n{response}",
    seed: int = 0,
    completions_file: str | Path | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Samples, labels, trains, evaluates and saves a reward model; see the module docstring.

    Args:
        out: Output directory (created).
        task: reasoning-gym task.
        task_kwargs: The task's config; None uses :data:`DEFAULT_TASK_KWARGS`.
        num_labelled: Labelled completions to train on (one per prompt).
        num_test: Held-out completions (other prompts) to measure accuracy on.
        sampler: Prompts -> responses; None loads :class:`SmolLMSampler`.
        backbone: Classifier backbone directory; None uses all-MiniLM-L6-v2 (:func:`vrpo_pl.hub.minilm_path`).
        epochs: Training epochs.
        lr: Learning rate.
        batch_size: Training batch size.
        max_length: Tokens kept per input, at training and in the saved RewardModel's evaluation.
        balance: Re-weight the positive class to balance the classes.
        template: Input text from prompt and response; use the same in the ``RewardModel`` that loads it.
        seed: Seed of the prompts, the sampling, the head's initialization and the shuffling.
        completions_file: A ``completions.jsonl`` from an earlier run to reuse instead of sampling.
        verbose: Print the default sampler's progress to stderr.

    Returns:
        The report also written to ``out/report.json``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from vrpo_pl import hub

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    verifier = NumericVerifier()
    if completions_file is not None:
        completions = [Completion(**json.loads(line)) for line in Path(completions_file).read_text().splitlines()]
        completions = completions[: num_labelled + num_test]
    else:
        entries = task_entries(task, num_labelled + num_test, seed, task_kwargs)
        sampler = SmolLMSampler(seed=seed, verbose=verbose) if sampler is None else sampler
        completions = to_completions(entries, sampler([e["question"] for e in entries]), task)
    if len(completions) < num_labelled + num_test:
        raise ValueError(f"train_reward_model: only {len(completions)} completions for {num_labelled} + {num_test}")
    _write_completions(out / "completions.jsonl", completions)
    sampled = time.perf_counter()

    train, test = completions[:num_labelled], completions[num_labelled:]
    labels = verifier.score(train).gold
    backbone = hub.minilm_path() if backbone is None else Path(backbone)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    tokenizer.truncation_side = "left"
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)
    texts = [template.format(prompt=c.prompt, response=c.response) for c in train]
    losses = train_classifier(model, tokenizer, texts, labels, epochs, lr, batch_size, max_length, balance, seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    trained = time.perf_counter()

    rm = RewardModel(str(out), gold=verifier, max_length=max_length, template=template)
    metrics = rm.score(test).metrics if test else {}
    test_positive_rate = verifier.score(test).gold.mean().item() if test else math.nan
    report = {
        "task": task,
        "task_kwargs": DEFAULT_TASK_KWARGS.get(task, {}) if task_kwargs is None else task_kwargs,
        "num_train": len(train),
        "num_test": len(test),
        "train_positive_rate": labels.mean().item(),
        "test_positive_rate": test_positive_rate,
        "accuracy": metrics.get("rm_accuracy", math.nan),
        "majority_baseline": max(test_positive_rate, 1 - test_positive_rate),
        "false_positive_rate": metrics.get("false_positive_rate", math.nan),
        "false_negative_rate": metrics.get("false_negative_rate", math.nan),
        "epoch_losses": losses,
        "template": template,
        "max_length": max_length,
        "backbone": str(backbone),
        "seconds_sampling": sampled - started,
        "seconds_training": trained - sampled,
        "seconds_total": time.perf_counter() - started,
    }
    # Youden's J = TPR - FPR: learning from this reward is possible only while J > 0 (arXiv 2601.04411).
    report["youden_j"] = 1 - report["false_positive_rate"] - report["false_negative_rate"]
    report["balanced_accuracy"] = 0.5 + 0.5 * report["youden_j"]
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _write_completions(path: Path, completions: list[Completion]) -> None:
    """One JSON object per line with the fields of each completion."""
    fields = ("prompt", "response", "answer", "metadata", "num_tokens", "truncated")
    rows = [json.dumps({f: getattr(c, f) for f in fields}) for c in completions]
    path.write_text("\n".join(rows) + "\n")


def format_report(report: dict[str, Any]) -> str:
    """A few human-readable lines from a report."""
    return (
        f"task {report['task']} {report['task_kwargs']}\n"
        f"train {report['num_train']} (positive rate {report['train_positive_rate']:.3f}), "
        f"test {report['num_test']} (positive rate {report['test_positive_rate']:.3f})\n"
        f"accuracy vs. verifier {report['accuracy']:.3f} (majority baseline {report['majority_baseline']:.3f}, "
        f"balanced accuracy {report['balanced_accuracy']:.3f}), "
        f"FPR {report['false_positive_rate']:.3f}, FNR {report['false_negative_rate']:.3f}, "
        f"Youden J {report['youden_j']:.3f}\n"
        f"time: sampling {report['seconds_sampling']:.0f} s, training {report['seconds_training']:.0f} s, "
        f"total {report['seconds_total']:.0f} s"
        + (f"\nwarning: Youden's J {report['youden_j']:.3f} <= 0 on the held-out completions: this reward model is no "
           "better than chance at telling right answers from wrong ones, so training on it teaches nothing (or the "
           "opposite of the task). Train longer (--epochs; reuse the samples with --completions OUT/completions.jsonl) "
           "or label more (--num-labelled)" if report["youden_j"] <= 0 else "")
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; prints the report and returns it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory for model, tokenizer and report.json")
    parser.add_argument("--task", default="chain_sum", help="reasoning-gym task")
    parser.add_argument(
        "--task-kwargs",
        type=json.loads,
        default=None,
        help="the task's config as JSON; default: 2-term 1-digit chain_sum, reasoning-gym's defaults elsewhere",
    )
    parser.add_argument("--num-labelled", type=int, default=256, help="labelled completions to train on")
    parser.add_argument("--num-test", type=int, default=128, help="held-out completions for the accuracy")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128, help="tokens kept per classifier input")
    parser.add_argument("--no-balance", dest="balance", action="store_false", help="no positive-class re-weighting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--completions", default=None, help="reuse a completions.jsonl instead of sampling")
    args = parser.parse_args(argv)
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()  # the "classifier newly initialized" load report is expected here
    report = train_reward_model(
        out=args.out,
        task=args.task,
        task_kwargs=args.task_kwargs,
        num_labelled=args.num_labelled,
        num_test=args.num_test,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        balance=args.balance,
        seed=args.seed,
        completions_file=args.completions,
        verbose=True,
    )
    print(format_report(report))
    return report


if __name__ == "__main__":
    main()
