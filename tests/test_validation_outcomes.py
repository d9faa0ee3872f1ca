"""ValidationOutcomes writes each validation's per-question results, the one before training included."""

from __future__ import annotations

import json


def test_every_validation_writes_one_line_per_question(run_cli, tmp_path):
    cli = run_cli(tmp_path, "--trainer.callbacks+=vrpo_pl.callbacks.ValidationOutcomes",
                  "--trainer.callbacks.dirpath", str(tmp_path / "outcomes"), max_steps=2)
    lines = [json.loads(line) for line in (tmp_path / "outcomes" / "val_outcomes.jsonl").read_text().splitlines()]
    val_size = cli.datamodule.val_size
    rollouts = [line["rollout"] for line in lines]
    assert sorted(set(rollouts)) == [0, 2] and len(lines) == 2 * val_size  # tiny.yaml validates every 2 rollouts
    assert {"id", "gold", "length", "response", "rank"} <= set(lines[0])
    ids = {line["id"] for line in lines if line["rollout"] == 0}
    assert ids == {line["id"] for line in lines if line["rollout"] == 2}, "the same questions every time"
    for rollout in (0, 2):
        mean = sum(line["gold"] for line in lines if line["rollout"] == rollout) / val_size
        assert 0.0 <= mean <= 1.0
