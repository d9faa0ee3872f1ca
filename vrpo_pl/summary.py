"""Reads a run's TensorBoard event files back and prints what changed: gold accuracy before and after, and the
training curves beside it.

    python -m vrpo_pl.summary runs/quickstart            # the newest version_* under it
    python -m vrpo_pl.summary runs/quickstart/version_3 --tags val/accuracy reward/gold kl/ref
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_TAGS = ("val/accuracy", "val/response_length", "reward/train", "reward/gold", "response/length", "kl/ref",
                "value/explained_variance")


def find_run(path: str | Path) -> Path:
    """``path`` itself when it holds event files, else its newest ``version_*`` subdirectory that does."""
    path = Path(path)
    if any(path.glob("events.out.tfevents.*")):
        return path
    versions = [d for d in path.glob("version_*") if any(d.glob("events.out.tfevents.*"))]
    if not versions:
        raise FileNotFoundError(f"no TensorBoard event files in {path} or its version_* directories")
    return max(versions, key=lambda d: max(f.stat().st_mtime for f in d.glob("events.out.tfevents.*")))


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run as (step, value) pairs sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}


def summarize(scalars: dict[str, list[tuple[int, float]]], tags: tuple[str, ...] = DEFAULT_TAGS) -> str:
    """A text report: the first and last value of each tag present, and the gold accuracy at every validation."""
    lines = []
    val = scalars.get("val/accuracy", [])
    if val:
        (s0, v0), (s1, v1) = val[0], val[-1]
        lines.append(f"val/accuracy (gold, greedy): {v0:.3f} at rollout {s0} -> {v1:.3f} at rollout {s1} "
                     f"({v1 - v0:+.3f})")
        lines.append("  every validation: " + ", ".join(f"{s}: {v:.3f}" for s, v in val))
    width = max((len(t) for t in tags), default=0)
    for tag in tags:
        points = scalars.get(tag)
        if not points or tag == "val/accuracy":
            continue
        values = " ".join(f"{v:.3g}" for _, v in points)
        lines.append(f"{tag:<{width}}  first {points[0][1]:.3f}  last {points[-1][1]:.3f}  [{values}]")
    if not lines:
        return "no scalars of " + ", ".join(tags) + " in this run"
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory (or a logger directory holding version_* runs)")
    parser.add_argument("--tags", nargs="+", default=list(DEFAULT_TAGS), help="scalar tags to report")
    args = parser.parse_args(argv)
    try:
        run_dir = find_run(args.run)
    except FileNotFoundError as err:
        print(f"error: {err}; pass the logger's save_dir/name (e.g. runs/quickstart)", file=sys.stderr)
        return 2
    print(f"run: {run_dir}")
    print(summarize(read_scalars(run_dir), tuple(args.tags)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
