"""Reading a study back: per-run scalars and per-question outcomes, tables with bootstrap intervals, and plots.

A study (``benchmarks/robustness.py``) is a directory of runs ``runs/<algorithm>/<noise>/seed<k>``, each with its
TensorBoard events and ``val_outcomes.jsonl`` (:class:`vrpo_pl.callbacks.ValidationOutcomes`). This module turns
them into:

- per (algorithm, noise): final and best gold accuracy, mean with a 95% bootstrap interval over seeds and questions
  (:mod:`vrpo_pl.stats`), initial accuracy, response length and KL at the end;
- paired differences (e.g. VRPO - PPO) per noise, per seed and question, with their intervals;
- training curves averaged over seeds (gold accuracy, response length, KL, explained variance) and the mean
  |advantage| on key tokens against the other tokens.

A finished run can also be kept as one small JSON record (:func:`save_result`, :func:`load_result`): its scalars
and outcomes, plus where it ran. A study's records, committed, carry it across machines and fresh clones, where the
run directories (event files, checkpoints) are gone.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vrpo_pl.stats import Estimate, bootstrap_mean
from vrpo_pl.summary import read_scalars

CURVES = ("val/accuracy", "response/length", "kl/ref", "value/explained_variance")


@dataclass
class RunResult:
    """One finished run: its scalar curves and, per validation rollout, {question id: gold outcome}."""

    algorithm: str
    noise: str
    seed: int
    scalars: dict[str, list[tuple[int, float]]]
    outcomes: dict[int, dict[str, float]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    """Where and how it ran (CPU, dtype, seconds, commit), as recorded by :func:`save_result`."""


def read_outcomes(run_dir: Path) -> dict[int, dict[str, float]]:
    """``{rollout: {question id: gold}}`` from a run's ``val_outcomes*.jsonl`` (every rank's file)."""
    outcomes: dict[int, dict[str, float]] = {}
    for path in sorted(run_dir.glob("val_outcomes*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("gold") is not None:
                outcomes.setdefault(row["rollout"], {})[str(row["id"])] = float(row["gold"])
    return outcomes


def read_run(run_dir: Path, algorithm: str, noise: str, seed: int) -> RunResult:
    return RunResult(algorithm, noise, seed, read_scalars(run_dir), read_outcomes(run_dir))


def save_result(result: RunResult, path: Path, meta: dict) -> None:
    """Writes ``result`` and ``meta`` to ``path`` as JSON (values to 6 significant digits), atomically."""
    record = {
        "algorithm": result.algorithm, "noise": result.noise, "seed": result.seed, "meta": meta,
        "scalars": {tag: [[step, float(f"{value:.6g}")] for step, value in points]
                    for tag, points in sorted(result.scalars.items())},
        "outcomes": {str(rollout): outcome for rollout, outcome in sorted(result.outcomes.items())},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, separators=(",", ":")) + "\n")
    tmp.replace(path)


def load_result(path: Path) -> RunResult:
    """A :class:`RunResult` from a :func:`save_result` record; a clear error naming ``path`` if it is not one."""
    try:
        record = json.loads(path.read_text())
        return RunResult(record["algorithm"], record["noise"], int(record["seed"]),
                         {tag: [(int(s), float(v)) for s, v in points] for tag, points in record["scalars"].items()},
                         {int(k): {q: float(g) for q, g in o.items()} for k, o in record["outcomes"].items()},
                         record.get("meta", {}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"{path}: not a study record ({type(e).__name__}: {e}); delete it to run that run again") from e


def _chosen(runs: list[RunResult], rollout: int | str) -> list[dict[str, float]]:
    """Each run's outcomes at ``rollout``: an int, ``"final"`` or ``"best"`` (its most accurate validation)."""
    if rollout == "final":
        return [r.outcomes[max(r.outcomes)] for r in runs]
    if rollout == "best":
        return [max(r.outcomes.values(), key=lambda o: sum(o.values()) / max(len(o), 1)) for r in runs]
    return [r.outcomes[rollout] for r in runs]


def outcome_matrix(runs: list[RunResult], rollout: int | str, questions: list[str] | None = None) -> torch.Tensor:
    """(seeds, questions) gold outcomes at ``rollout`` (see :func:`_chosen`), seeds in ascending order, over
    ``questions`` (default: those every run answered)."""
    chosen = _chosen(sorted(runs, key=lambda r: r.seed), rollout)
    if questions is None:
        questions = sorted(set.intersection(*(set(c) for c in chosen))) if chosen else []
    return torch.tensor([[c[q] for q in questions] for c in chosen])


def _tail_mean(points: list[tuple[int, float]], fraction: float = 0.1) -> float:
    values = [v for _, v in points]
    k = max(1, round(fraction * len(values)))
    return statistics.fmean(values[-k:]) if values else math.nan


@dataclass
class Cell:
    """One (algorithm, noise) of a study."""

    seeds: list[int]
    initial: Estimate
    final: Estimate
    best: Estimate
    length: float
    kl: float
    explained_variance: float
    """The median over each run's rollout batches (one batch with nearly constant returns gives a huge negative
    value), averaged over seeds."""
    abs_adv_key: float
    abs_adv_other: float


def cell(runs: list[RunResult]) -> Cell:
    """The table entry of one (algorithm, noise) from its runs (one per seed)."""
    def tail(tag: str) -> float:
        values = [_tail_mean(r.scalars.get(tag, [])) for r in runs if r.scalars.get(tag)]
        return statistics.fmean(values) if values else math.nan

    def over_run(tag: str, center=statistics.fmean) -> float:
        values = [center([v for _, v in r.scalars[tag]]) for r in runs if r.scalars.get(tag)]
        return statistics.fmean(values) if values else math.nan

    initial = bootstrap_mean(outcome_matrix(runs, 0))
    return Cell([r.seed for r in runs], initial, bootstrap_mean(outcome_matrix(runs, "final")),
                bootstrap_mean(outcome_matrix(runs, "best")), tail("response/length"), tail("kl/ref"),
                over_run("value/explained_variance", statistics.median), over_run("adv/abs_key"),
                over_run("adv/abs_other"))


def paired(runs_a: list[RunResult], runs_b: list[RunResult], rollout: int | str = "final") -> Estimate | None:
    """``a - b`` on the seeds and questions both have (pairs: same seed, same question), or None without a shared
    seed: :func:`pooled_paired` over this one cell."""
    return pooled_paired([(runs_a, runs_b)], rollout)


def pooled_paired(pairs: list[tuple[list[RunResult], list[RunResult]]], rollout: int | str = "final"
                  ) -> Estimate | None:
    """``a - b`` pooled over several cells (e.g. every noise): each cell's paired seeds become rows of one (cell x
    seed, questions) array over the questions every run answered, then :func:`bootstrap_mean` resamples rows and
    questions. The average difference over the cells, with the run-to-run spread of all of them behind its interval;
    None without a shared seed."""
    matched = []
    for runs_a, runs_b in pairs:
        seeds = {r.seed for r in runs_a} & {r.seed for r in runs_b}
        matched.append(([r for r in runs_a if r.seed in seeds], [r for r in runs_b if r.seed in seeds]))
    matched = [(a, b) for a, b in matched if a]
    if not matched:
        return None
    chosen = [c for a, b in matched for c in _chosen(a + b, rollout)]
    questions = sorted(set.intersection(*(set(c) for c in chosen)))
    rows = [outcome_matrix(a, rollout, questions).double() - outcome_matrix(b, rollout, questions).double()
            for a, b in matched]
    return bootstrap_mean(torch.cat(rows))


def mean_curve(runs: list[RunResult], tag: str) -> tuple[list[int], list[float]]:
    """A tag's curve averaged over the runs at the steps they all logged."""
    curves = [dict(r.scalars[tag]) for r in runs if r.scalars.get(tag)]
    if not curves:
        return [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return steps, [statistics.fmean(c[s] for c in curves) for s in steps]
