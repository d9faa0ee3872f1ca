"""The benchmark scripts run end to end at TinyLM scale and write their tables and plot with the expected rows.

They are not timed: the numbers are not checked, only that every piece of the report is there.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def benchmarks(repo_root):
    """The scripts under benchmarks/ loaded as modules (they are scripts, not a package)."""
    modules = {}
    for name in ("robustness", "throughput", "peer_trl", "prefix_passes", "decode_steps"):
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", repo_root / "benchmarks" / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = modules[name]  # dataclasses look their module up there
        spec.loader.exec_module(modules[name])
    return modules


def value(command: list[str], flag: str) -> str:
    """The value after ``flag`` in a command line."""
    return command[command.index(flag) + 1]


def test_robustness_dry_run_plans_every_run(benchmarks, tmp_path, capsys):
    """The small CPU setting: quickstart.yaml, one command per algorithm x noise x seed, its own log directory."""
    argv = ["--small", "--out", str(tmp_path), "--algorithms", "ppo", "vrpo_aux_only", "--noises", "asym", "length",
            "--seeds", "0", "1", "--dry-run", "--", "--model.kl.coef", "0.05"]
    assert benchmarks["robustness"].main(argv) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if " fit " in line]
    assert len(commands) == 8
    first = commands[0]
    assert value(first, "--config").endswith("configs/quickstart.yaml")
    assert first[-2:] == ["--model.kl.coef", "0.05"]
    versions = {(value(c, "--trainer.logger.init_args.name"), value(c, "--trainer.logger.init_args.version"))
                for c in commands}
    assert ("vrpo_aux_only/length", "seed1") in versions and len(versions) == 8
    aux_only = next(c for c in commands if "vrpo_aux_only/asym" in c)
    assert value(aux_only, "--model.critic.vib") == "false"
    assert "AsymmetricFlip" in value(aux_only, "--model.reward")
    assert not any(tmp_path.iterdir()), "a dry run must not create anything"


def test_robustness_medium_plans_the_study(benchmarks, capsys, tmp_path):
    """3 algorithms x 6 noises x 3 seeds, plus the ablations at flip0.3 (GRPO's correction only on flip noises),
    every seed's noise seeded by the seed, and the per-question outcomes recorded."""
    assert benchmarks["robustness"].main(["--medium", "--out", str(tmp_path), "--dry-run"]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if " fit " in line]
    names = [value(c, "--trainer.logger.init_args.name") for c in commands]
    assert len(commands) == (3 * 6 + 3) * 3
    assert {"vrpo_vib_only/flip0.3", "vrpo_aux_only/flip0.3", "grpo_corrected/flip0.3"} <= set(names)
    assert not any(n.startswith(("vrpo_vib_only/", "grpo_corrected/")) and not n.endswith("flip0.3") for n in names)
    corrected = next(c for c in commands if value(c, "--trainer.logger.init_args.name") == "grpo_corrected/flip0.3")
    assert "FlipRateCorrection" in value(corrected, "--model.reward")
    assert all("ValidationOutcomes" in value(c, "--trainer.callbacks") for c in commands)
    seed2 = [c for c in commands if value(c, "--trainer.logger.init_args.version") == "seed2"
             and value(c, "--trainer.logger.init_args.name").endswith("/flip0.45")]
    assert {json.loads(value(c, "--model.reward"))["init_args"]["seed"] for c in seed2} == {2}  # paired noise
    assert value(commands[0], "--data.val_size") == "256" and value(commands[0], "--trainer.max_steps") == "30"
    medium = benchmarks["robustness"].SETTINGS["medium"]
    assert (medium.jobs, medium.threads) == (2, 1)  # two 1-thread runs at once on 2 cores
    # The task must hold 256 distinct held-out questions and still leave questions to train on (2 terms of 1 digit
    # have only 200: the first version of this setting failed at start-up).
    from vrpo_pl.data import ReasoningGymSource

    source = ReasoningGymSource("chain_sum", json.loads(value(commands[0], "--data.source.init_args.params")))
    held_out = source.validation_records(256)
    assert len({r["prompt"] for r in held_out}) == 256
    assert source.train_record(0, val_size=256, seed=0)["prompt"] not in {r["prompt"] for r in held_out}


def test_robustness_variants_join_the_ablations(benchmarks, capsys, tmp_path):
    """--variants adds VRPO's four variants at the ablation noise only, beside the grid and the ablations; without
    the ablation noise (or in a setting without one) it is refused, naming the flag."""
    robustness = benchmarks["robustness"]
    assert robustness.main(["--medium", "--out", str(tmp_path), "--variants", "--dry-run"]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if " fit " in line]
    names = [value(c, "--trainer.logger.init_args.name") for c in commands]
    assert len(commands) == (3 * 6 + 3 + 4) * 3
    variants = {n for n in names if n.split("/")[0] in robustness.VARIANTS}
    assert variants == {f"{v}/flip0.3" for v in robustness.VARIANTS}
    weight = next(c for c in commands if value(c, "--trainer.logger.init_args.name") == "vrpo_weight/flip0.3")
    assert value(weight, "--model.critic.aux") == "weight"
    # Named algorithms: no ablations, but the variants still join at the ablation noise.
    assert robustness.main(["--medium", "--out", str(tmp_path), "--variants", "--algorithms", "ppo", "--noises",
                            "flip0.3", "--seeds", "0", "--dry-run"]) == 0
    names = [value(shlex.split(line), "--trainer.logger.init_args.name")
             for line in capsys.readouterr().out.splitlines() if " fit " in line]
    assert sorted(names) == sorted(["ppo/flip0.3", *(f"{v}/flip0.3" for v in robustness.VARIANTS)])
    for argv in (["--medium", "--noises", "none"], ["--small"]):
        with pytest.raises(SystemExit):
            robustness.main([*argv, "--out", str(tmp_path), "--variants", "--dry-run"])
        assert "--variants" in capsys.readouterr().err


def test_pass_benchmarks_measure_other_work_before_timing(benchmarks):
    """The header's contention mark comes from the cores other processes kept busy over a short window (not from
    the load average, which still counts a benchmark that has just ended)."""
    import os

    passes = benchmarks["prefix_passes"]
    busy = passes.busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1) + 1e-9
    assert "(contended)" in passes.load_line(1.5) and "(contended)" not in passes.load_line(0.1)
    assert "cores busy" in passes.load_line(0.1) and "cores busy" not in passes.load_line()
    assert "load average" in passes.load_line() and "contended" not in passes.load_line()


def test_decode_steps_tiny_reports_both_variants_and_the_floor(benchmarks, tmp_path, single_thread):
    """The decode microbenchmark times the lean steps and the model's own forward over the same prompts, and the
    matrix floor of a step; bad arguments stop it with the flag named."""
    out = tmp_path / "decode.md"
    decode_steps = benchmarks["decode_steps"]
    assert decode_steps.main(["--tiny", "--rounds", "1", "--prompts", "2", "--samples", "2", "--new-tokens", "4",
                              "--out", str(out)]) == 0
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.read_text().splitlines()
            if line.startswith("| lean") or line.startswith("| the model's")}
    assert set(rows) == {"lean (vrpo_pl.decode)", "the model's forward"}
    for cells in rows.values():
        total, prefill, step, floor, ratio = (float(c) for c in cells)
        assert 0 < prefill < total and step > 0 and floor > 0 and ratio > 0
    with pytest.raises(SystemExit):
        decode_steps.parse_args(["--new-tokens", "1"])


def test_prefix_passes_tiny_reports_every_pass(benchmarks, tmp_path, single_thread):
    """The pass microbenchmark times each pass plain, shared and packed (two pack sizes; policy and critic also
    fused) and counts the tokens fed:
    with 4 samples per prompt the shared passes feed fewer prompt tokens and the same others, the packed ones (in
    one pack) the shared prompts and fewer others (no padding)."""
    out = tmp_path / "prefix.md"
    assert benchmarks["prefix_passes"].main(["--tiny", "--rounds", "1", "--prompts", "2", "--new-tokens", "4",
                                             "--chunk", "4", "--pack-tokens", "512", "8", "--out", str(out)]) == 0
    text = out.read_text()
    assert "load average" in text and "/work/scratch/BUSY" in text
    for name in ("reference", "values", "policy_grad", "critic_grad", "fused_grad"):
        fed = {}
        for variant in ("plain", "shared", "packed 512", "packed 8"):
            row = next(line for line in text.splitlines() if line.startswith(f"| {name} | {variant} |"))
            fed[variant] = tuple(map(int, row.strip("|").split("|")[4].split(" + ")))
        assert fed["shared"][0] < fed["plain"][0] and fed["shared"][1] == fed["plain"][1], fed
        # Packs hold no padding: fewer other tokens than the shared pass, whose responses are padded to the longest.
        assert fed["packed 512"][0] < fed["plain"][0] and fed["packed 512"][1] < fed["shared"][1], fed
        assert sum(fed["packed 8"]) >= sum(fed["packed 512"]), fed  # small packs: prompts repeated, packs padded


@pytest.mark.slow
def test_robustness_tiny_writes_table_and_plot(benchmarks, tmp_path, capsys):
    argv = ["--tiny", "--out", str(tmp_path), "--algorithms", "ppo", "--noises", "flip0.2", "--max-steps", "1"]
    assert benchmarks["robustness"].main(argv) == 0
    results = (tmp_path / "results.md").read_text()
    assert "| algorithm | flip0.2 |" in results
    assert "| ppo | flip0.2 | 1 |" in results
    assert "## Paired differences" in results and "95% bootstrap interval" in results
    # Each seed's final accuracy per algorithm: with one seed, the cell's final mean.
    per_seed = next(line for line in results.splitlines() if line.startswith("| flip0.2 | 0 | "))
    cell_row = next(line for line in results.splitlines() if line.startswith("| ppo | flip0.2 | 1 |"))
    assert per_seed.split(" | ")[2] == cell_row.split(" | ")[4].split(" [")[0]
    for png in (tmp_path / "robustness.png", tmp_path / "robustness_curves.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    run = tmp_path / "runs" / "ppo" / "flip0.2" / "seed0"
    assert list(run.glob("events.out.tfevents.*"))
    assert len((run / "val_outcomes.jsonl").read_text().splitlines()) == 2 * 4  # rollouts 0 and 1 x 4 questions
    capsys.readouterr()
    # Resume-safe: the complete run is skipped, the report is rebuilt.
    assert benchmarks["robustness"].main(argv) == 0
    assert "skipped (complete)" in capsys.readouterr().out
    # A ledger records the finished run; with the run directories gone (a fresh clone) it stands in for them.
    ledger = tmp_path / "ledger"
    assert benchmarks["robustness"].main(argv + ["--ledger", str(ledger)]) == 0
    record = json.loads((ledger / "ppo" / "flip0.2" / "seed0.json").read_text())
    assert record["meta"]["cpu"] and record["meta"]["commit"] and "--model.algorithm ppo" in record["meta"]["command"]
    # What the run computed with: tiny.yaml's pinned float32 (not the setting's "auto"); its threads are not known
    # for a run found complete (a run started here records them, below).
    assert record["meta"]["dtype"] == "float32" and record["meta"]["threads"] is None
    assert sorted(record["outcomes"]) == ["0", "1"] and len(record["outcomes"]["1"]) == 4
    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "results.md").rename(tmp_path / "results_from_runs.md")
    capsys.readouterr()
    assert benchmarks["robustness"].main(argv + ["--ledger", str(ledger), "--report-only"]) == 0
    def tables(path):  # the report without its command line, which differs
        return [line for line in path.read_text().splitlines() if not line.startswith("Command:")]

    assert tables(tmp_path / "results.md") == tables(tmp_path / "results_from_runs.md")
    assert benchmarks["robustness"].main(argv + ["--ledger", str(ledger)]) == 0
    assert "skipped (recorded)" in capsys.readouterr().out and not (tmp_path / "runs" / "ppo" / "flip0.2").exists()
    # A run started with a ledger records the threads it ran with (the tiny setting's one).
    assert benchmarks["robustness"].main(argv + ["--seeds", "1", "--ledger", str(ledger)]) == 0
    assert json.loads((ledger / "ppo" / "flip0.2" / "seed1.json").read_text())["meta"]["threads"] == 1


def test_study_record_rejects_a_file_that_is_not_one(tmp_path):
    from vrpo_pl.study import load_result

    path = tmp_path / "seed0.json"
    path.write_text('{"algorithm": "ppo"}')
    with pytest.raises(ValueError, match="seed0.json: not a study record.*delete it"):
        load_result(path)


@pytest.mark.slow
def test_throughput_tiny_reports_every_algorithm(benchmarks, tmp_path, single_thread):
    out = tmp_path / "throughput.md"
    argv = ["--tiny", "--iters", "1", "--prompts", "2", "--samples", "2", "--new-tokens", "4", "--mini-batch", "2",
            "--epochs", "1", "--no-isolate", "--out", str(out)]
    assert benchmarks["throughput"].main(argv) == 0
    text = out.read_text()
    for row in ("| ppo |", "| grpo |", "| vrpo |", "| policy alone (reference) |"):
        assert row in text
    assert "lower bound" in text and "ratio" in text
    header = next(line for line in text.splitlines() if line.startswith("| algorithm | s / rollout batch"))
    fused = [c.strip() for c in header.split("|")].index("fused update")
    for algorithm, fuses in (("ppo", True), ("grpo", False), ("vrpo", True)):  # LoRA policy and critic: fused passes
        row = next(line for line in text.splitlines() if line.startswith(f"| {algorithm} |"))
        assert (float(row.split("|")[fused]) > 0) == fuses, row
    # The compute bound by phase: each phase's seconds over its own arithmetic, the three bounds adding up to the
    # step's compute bound.
    main_cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
                  for line in text.split("Compute bound by phase")[0].splitlines() if line.startswith("| ")}
    columns = main_cells["algorithm"]
    phase_table = text.split("Compute bound by phase")[1].split("Lower bound")[0]
    for algorithm in ("ppo", "grpo", "vrpo"):
        cells = next([c.strip() for c in line.split("|")[1:-1]] for line in phase_table.splitlines()
                     if line.startswith(f"| {algorithm} |"))
        bounds = [float(cells[i]) for i in (2, 5, 8)]
        row = main_cells[algorithm]
        step_bound = float(row[columns.index("s / rollout batch")]) / float(row[columns.index("x bound")].strip("*"))
        assert all(b > 0 for b in bounds) and sum(bounds) == pytest.approx(step_bound, rel=0.02), (cells, step_bound)
        assert float(cells[1]) == pytest.approx(float(main_cells[algorithm][columns.index("generation")]), abs=1e-3)
        # The arithmetic done (each repeated prompt once: 2 samples per prompt here) is less, its ratio no lower.
        done = next([c.strip() for c in line.split("|")[1:-1]] for line in phase_table.split("The arithmetic")[1]
                    .splitlines() if line.startswith(f"| {algorithm} |"))
        assert 0 < float(done[2]) < step_bound
        assert float(done[3].strip("*")) >= float(row[columns.index("x bound")].strip("*"))
    png = out.with_suffix(".png")
    assert png.stat().st_size > 10_000, "the phase plot was not drawn"
    png.unlink()
    assert benchmarks["throughput"].main(["--plot", str(out)]) == 0  # redraw from the report alone
    assert png.exists()
    (tmp_path / "empty.md").write_text("no table here\n")
    with pytest.raises(ValueError, match="no phase table"):
        benchmarks["throughput"].main(["--plot", str(tmp_path / "empty.md")])


def test_peer_trl_reward_rule_and_report(benchmarks):
    """The TRL side's reward is NumericVerifier's rule; the report pools rounds and takes ratios to ours."""
    import argparse

    peer = benchmarks["peer_trl"]
    completions = [[{"role": "assistant", "content": "3 + 4 = 7."}], "It is 8", "none", "-2"]
    assert peer.last_number_reward(completions, ["7", "7", "1", "-2"]) == [1.0, 0.0, 0.0, 1.0]

    def record(config, intervals, peak):
        return {"config": config, "interval": intervals, "in_step": [], "generation": [1.0] * len(intervals),
                "tokens": [500.0] * len(intervals), "samples": 32, "peak_bytes": peak, "command": f"run {config}"}

    results = {"ours": [record("ours", [2.0, 2.0, 4.0], 2**30), record("ours", [2.0], 2**29)],
               "trl-fp32": [record("trl-fp32", [8.0, 8.0, 8.0], 2**31), record("trl-fp32", [8.0], 2**31)]}
    summary = peer.summarize(results["ours"])
    assert summary["interval"] == 2.0 and summary["samples_per_s"] == 16.0 and summary["peak_bytes"] == 2**30
    args = argparse.Namespace(prompts=8, samples=4, new_tokens=32, iters=3, rounds=2, configs=["ours", "trl-fp32"])
    context = {"trl": "1.16.0", "cpu": "test CPU", "ours_threads": 2, "trl_threads": 2, "date": "today",
               "torch": "2.13.0", "transformers": "5.23.0"}
    text = peer.report(results, args, context)
    trl_row = next(line for line in text.splitlines() if line.startswith("| TRL fp32"))
    assert "| 8.000 |" in trl_row and trl_row.rstrip(" |").endswith("4.00")  # ours is 4x its samples/s
    assert "test CPU" in text and "run ours" in text


def test_peer_trl_runs_our_side_as_a_throughput_child(benchmarks, tmp_path):
    """The command peer_trl gives our side is one throughput.py accepts, measuring GRPO with our sampler (a child
    called with a bare ``--only grpo`` once ran with an empty ``--model.generation.backend`` and failed)."""
    import argparse

    peer, throughput = benchmarks["peer_trl"], benchmarks["throughput"]
    args = argparse.Namespace(prompts=8, samples=4, new_tokens=32, iters=3, threads=2,
                              ours_python=Path(sys.executable))
    for config, dtype, precision in (("ours", "auto", "32-true"), ("ours-bf16", "float32", "bf16-mixed")):
        cmd = peer.config_command(config, args, tmp_path / "rec.json")
        assert cmd[1].endswith("throughput.py")
        parsed = throughput.parse_args(cmd[2:])
        assert parsed.isolated_child and (parsed.dtype, parsed.precision) == (dtype, precision)
        assert throughput.child_target(parsed.only) == ("grpo", "loop")
    assert throughput.child_target("vrpo") == ("vrpo", "loop")
    assert throughput.child_target("ppo:vllm") == ("ppo", "vllm")


@pytest.mark.parametrize("lora, critic_lora, algorithm, fast, expected", [
    ({"r": 16}, {"r": 16}, "vrpo", True, "bfloat16"),
    ({"r": 16}, {"r": 16}, "vrpo", False, "float32"),
    ({"r": 16}, None, "ppo", True, "float32"),  # the critic trains fully: float32 weights
    ({"r": 16}, None, "grpo", True, "bfloat16"),  # no critic: the policy's LoRA is all that trains
    (None, None, "grpo", True, "float32"),
])
def test_study_record_names_the_dtype_the_run_resolved(benchmarks, tmp_path, monkeypatch, lora, critic_lora,
                                                       algorithm, fast, expected):
    """A ledger record names the weights' dtype the run computed in, ``auto`` resolved from the run's saved config
    as the run resolved it, not the flag's "auto"."""
    import yaml

    import vrpo_pl.models

    robustness = benchmarks["robustness"]
    monkeypatch.setattr(vrpo_pl.models, "bf16_is_fast", lambda device: fast)
    run = robustness.Run(algorithm, "none", 0, tmp_path, [])
    assert robustness.run_dtype(run) == "unknown"
    config = {"trainer": {"accelerator": "cpu"},
              "model": {"algorithm": algorithm, "dtype": "auto", "lora": lora, "critic_lora": critic_lora}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert robustness.run_dtype(run) == expected
    config["model"]["dtype"] = "float32"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert robustness.run_dtype(run) == "float32"


def test_throughput_compute_bound_counts_every_critic_pass(benchmarks):
    """The step's FLOPs grow by one critic forward + backward over the batch per critic epoch (the critic's passes,
    ``--model.ppo.critic_epochs``, not the policy's ``epochs``)."""
    from types import SimpleNamespace

    import torch

    body = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False))
    policy = SimpleNamespace(config=SimpleNamespace(hidden_size=4, vocab_size=10), named_modules=body.named_modules)
    mask = torch.ones(2, 3)
    rollout = SimpleNamespace(attention_mask=torch.ones(2, 5), prompt_width=2, mask=mask, size=2)

    from vrpo_pl.lora import LoRASpec

    critic_body = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=4))

    def flops(critic_epochs, critic=True, top_layers=None):
        ppo = SimpleNamespace(epochs=1, critic_epochs=critic_epochs)
        system = SimpleNamespace(policy=policy, lora_spec=LoRASpec(), critic_lora_spec=LoRASpec(top_layers=top_layers),
                                 sampler_logprobs=True, ppo=ppo,
                                 critic=SimpleNamespace(backbone=critic_body) if critic else None)
        return benchmarks["throughput"].step_flops(system, rollout)

    per_critic_pass = (2 + 2) * 32 * 10  # forward + activation gradients, 32 body parameters, 10 tokens
    assert flops(4) - flops(1) == 3 * per_critic_pass
    assert flops(None) == flops(1)  # None: as many as the policy's epochs
    assert flops(4, critic=False) == flops(1, critic=False)
    # Adapters on 1 of 4 layers: each critic pass backpropagates through a quarter of the body.
    assert flops(4) - flops(4, top_layers=1) == 4 * 2 * 0.75 * 32 * 10
    # By phase: the critic's epochs add to the update only, the phases add up to the step.
    ppo = SimpleNamespace(epochs=1, critic_epochs=4)
    system = SimpleNamespace(policy=policy, lora_spec=LoRASpec(), critic_lora_spec=LoRASpec(), sampler_logprobs=True,
                             ppo=ppo, critic=SimpleNamespace(backbone=critic_body))
    phases = benchmarks["throughput"].phase_flops(system, rollout)
    assert sum(phases.values()) == flops(4)
    ppo.critic_epochs = 1
    fewer = benchmarks["throughput"].phase_flops(system, rollout)
    assert phases["update"] - fewer["update"] == 3 * per_critic_pass
    assert phases["generation"] == fewer["generation"] and phases["frozen"] == fewer["frozen"]


def test_throughput_arithmetic_done_counts_each_shared_prompt_once(benchmarks):
    """``prompts_once``: where prompts are shared, each distinct prompt's columns but the last count once per pass
    (the prefill with share_prompt_prefill, the no-gradient passes with share_prompt_prefix, the update's when its
    mini-batches hold whole prompt groups); switched off, or with no repeated prompt, the plain count."""
    from types import SimpleNamespace

    import torch

    from vrpo_pl.lora import LoRASpec

    body = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False))  # 32 body parameters
    policy = SimpleNamespace(config=SimpleNamespace(hidden_size=4, vocab_size=10), named_modules=body.named_modules)
    # 4 rows, 3 prompt columns (2 distinct prompts, each twice) + 2 response columns.
    sequences = torch.tensor([[1, 2, 3, 9, 9], [1, 2, 3, 8, 8], [4, 5, 6, 9, 9], [4, 5, 6, 7, 7]])
    rollout = SimpleNamespace(sequences=sequences, attention_mask=torch.ones(4, 5), prompt_width=3,
                              mask=torch.ones(4, 2), size=4)

    def phases(share=True, prefill=True, shuffle="prompts", rollout=rollout, once=True):
        system = SimpleNamespace(
            policy=policy, lora_spec=LoRASpec(), critic_lora_spec=None, sampler_logprobs=True, critic=None,
            ppo=SimpleNamespace(epochs=1, critic_epochs=1, share_prompt_prefix=share, shuffle=shuffle),
            generation=SimpleNamespace(share_prompt_prefill=prefill))
        return benchmarks["throughput"].phase_flops(system, rollout, prompts_once=once)

    plain, once = phases(once=False), phases()
    saved = 4  # 12 prompt tokens; 2 distinct x 2 columns + 4 rows x the last column = 8 computed
    assert plain["generation"] - once["generation"] == 2 * 32 * saved
    assert plain["frozen"] - once["frozen"] == 2 * 32 * saved  # one reference pass
    assert plain["update"] - once["update"] == (2 + 2) * 32 * saved  # forward + activation gradients
    assert phases(prefill=False)["generation"] == plain["generation"]
    assert phases(share=False)["frozen"] == plain["frozen"] and phases(share=False)["update"] == plain["update"]
    assert phases(shuffle="rows")["update"] == plain["update"] and phases(shuffle="rows")["frozen"] == once["frozen"]
    distinct = SimpleNamespace(**{**vars(rollout), "sequences": torch.arange(20).reshape(4, 5)})
    assert phases(rollout=distinct) == phases(rollout=distinct, once=False)


@pytest.mark.parametrize("how", ["stop file", "stop after"])
def test_robustness_winds_down_without_starting_runs(benchmarks, tmp_path, capsys, how):
    """OUT/STOP (or --stop-after minutes passed) starts no new run; the report still comes out and lists the runs
    as missing, and nothing counts as failed."""
    argv = ["--tiny", "--out", str(tmp_path), "--algorithms", "ppo", "--noises", "flip0.2", "--max-steps", "1"]
    if how == "stop file":
        (tmp_path / "STOP").touch()
    else:
        argv += ["--stop-after", "0"]
    assert benchmarks["robustness"].main(argv) == 0
    out = capsys.readouterr().out
    assert "ppo / flip0.2 / seed 0: not started: " in out
    assert ("STOP exists (delete it to go on)" if how == "stop file" else "--stop-after minutes have passed") in out
    assert not (tmp_path / "runs" / "ppo").exists()
    assert "Missing (failed or not run): ppo/flip0.2/seed0" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("variant, critic, key_signal", [
    ("vrpo_weight", {"aux": "weight", "beta": 1e-4}, "entropy"),
    ("vrpo_key_only", {"aux": "predict", "aux_key_only": True}, "entropy"),
    ("vrpo_weight_surprisal", {"aux": "weight"}, "surprisal"),
    ("vrpo_beta1e-3", {"aux": None, "beta": 1e-3, "vib": None}, "entropy"),
])
def test_robustness_variants_parse_to_their_settings(benchmarks, tmp_path, capsys, monkeypatch, variant, critic,
                                                     key_signal):
    """Each of VRPO's named variants is a command line the CLI reads as that variant, with both study callbacks
    (the surprisal variant's own callback list replaces the common one, it does not add a second FrozenLMTargets)."""
    from vrpo_pl.cli import cli

    assert variant in benchmarks["robustness"].VARIANTS
    assert benchmarks["robustness"].main(["--tiny", "--out", str(tmp_path), "--algorithms", variant, "--noises",
                                          "none", "--dry-run"]) == 0
    command = next(shlex.split(line) for line in capsys.readouterr().out.splitlines() if " fit " in line)
    monkeypatch.setattr(sys, "argv", ["vrpo"])
    with pytest.raises(SystemExit):
        cli(["fit", "--print_config", *command[command.index("fit") + 1:]])
    import yaml

    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["algorithm"] == "vrpo"
    assert {k: config["model"]["critic"][k] for k in critic} == critic
    callbacks = config["trainer"]["callbacks"]
    assert [c["class_path"].rsplit(".", 1)[1] for c in callbacks] == ["FrozenLMTargets", "ValidationOutcomes"]
    assert callbacks[0]["init_args"]["key_signal"] == key_signal


def test_robustness_report_pairs_a_variant_with_ppo_and_vrpo(benchmarks):
    """A variant's row in the ablation table holds its paired differences against PPO and against VRPO, taken on
    the questions of the same seeds (synthetic runs: 4 questions, 2 seeds)."""
    from vrpo_pl.study import RunResult

    def run(algorithm, seed, correct):  # `correct`: how many of the 4 questions the final validation gets right
        outcomes = {0: {f"q{i}": 0.0 for i in range(4)}, 2: {f"q{i}": float(i < correct) for i in range(4)}}
        scalars = {"val/accuracy": [(0, 0.0), (2, correct / 4)], "response/length": [(1, 5.0), (2, 5.0)]}
        return RunResult(algorithm, "flip0.3", seed, scalars, outcomes)

    results = {(a, "flip0.3"): [run(a, seed, k) for seed in (0, 1)]
               for a, k in (("ppo", 1), ("vrpo", 2), ("vrpo_weight", 4))}
    text = benchmarks["robustness"].results_markdown(results, ["flip0.3"], "# header")
    table = text.split("## Ablations and variants at `flip0.3`")[1]
    row = next(line for line in table.splitlines() if line.startswith("| vrpo_weight |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "1.000"
    assert cells[2].startswith("+0.750") and cells[3].startswith("+0.500"), row  # minus PPO, minus VRPO


def test_robustness_report_pools_the_noisy_cells(benchmarks):
    """The pooled row averages VRPO - PPO over every noisy cell's paired seeds (the clean cell stays out): +0.5 in
    one cell and 0.0 in the other give +0.25; a cell with one algorithm alone adds nothing."""
    from vrpo_pl.study import RunResult, pooled_paired

    def run(algorithm, noise, seed, correct):
        outcomes = {0: {f"q{i}": 0.0 for i in range(4)}, 2: {f"q{i}": float(i < correct) for i in range(4)}}
        return RunResult(algorithm, noise, seed, {"val/accuracy": [(0, 0.0), (2, correct / 4)]}, outcomes)

    counts = {"none": {"ppo": 0, "vrpo": 4}, "flip0.3": {"ppo": 1, "vrpo": 3}, "vote": {"ppo": 2, "vrpo": 2}}
    results = {(a, n): [run(a, n, seed, k) for seed in (0, 1)] for n, ks in counts.items() for a, k in ks.items()}
    results[("vrpo", "random")] = [run("vrpo", "random", 0, 1)]
    pooled = pooled_paired([(results[("vrpo", n)], results[("ppo", n)]) for n in ("flip0.3", "vote")])
    assert pooled.mean == 0.25 and pooled.low <= 0.25 <= pooled.high
    assert pooled_paired([(results[("vrpo", "random")], [])]) is None
    text = benchmarks["robustness"].results_markdown(results, ["none", "flip0.3", "vote", "random"], "# h")
    row = next(line for line in text.splitlines() if "every noisy cell, pooled" in line)
    assert "(2 cells, 4 seeds paired with PPO)" in row and row.split("|")[2].strip().startswith("**+0.250"), row


def test_throughput_names_the_systems_draw_and_passes(benchmarks):
    """The measured run draws tokens as the system's default does, not as configs/quickstart.yaml pins them (its
    documented run reproduces with multinomial draws), unless --draw says otherwise; --no-pack-rows reaches the
    system, and so do --no-fuse-update and --no-lean-decode."""
    from vrpo_pl.rollout import GenerationSettings

    throughput = benchmarks["throughput"]
    command = throughput.cli_args("ppo", throughput.parse_args([]))
    assert value(command, "--model.generation.draw") == GenerationSettings().draw == "cdf"
    assert value(command, "--model.ppo.pack_rows") == value(command, "--model.ppo.fuse_update") == "true"
    assert value(command, "--model.generation.lean_decode") == "true"
    command = throughput.cli_args("ppo", throughput.parse_args(["--draw", "multinomial", "--no-pack-rows",
                                                                 "--no-fuse-update", "--no-lean-decode"]))
    assert value(command, "--model.generation.draw") == "multinomial"
    assert value(command, "--model.ppo.pack_rows") == value(command, "--model.ppo.fuse_update") == "false"
    assert value(command, "--model.generation.lean_decode") == "false"
