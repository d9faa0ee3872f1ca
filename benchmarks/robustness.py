"""Robustness benchmark: gold accuracy of PPO, GRPO and VRPO (and VRPO's ablations) as the training reward degrades.

Sweeps algorithm x noise x seed. Every run is its own ``vrpo fit --config <base> <overrides>`` subprocess with its
own TensorBoard directory ``OUT/runs/<algorithm>/<noise>/seed<k>`` (plus its ``console.log``); nothing is
overwritten. The event files are then read back into ``OUT/results.md`` (Markdown tables) and
``OUT/robustness.png`` (final gold accuracy per noise, and gold-accuracy, response-length and KL curves).

    python benchmarks/robustness.py --small --out runs/bench/robustness_small                  # 2 CPU cores, < 1 h
    python benchmarks/robustness.py --out runs/bench/robustness --accelerator gpu --precision bf16-mixed --jobs 4
    python benchmarks/robustness.py --tiny --out /tmp/robustness_tiny                          # TinyLM, seconds
    python benchmarks/robustness.py --small --noises none flip0.4 length --dry-run             # print the commands

Resume-safe: a run whose events already hold the final validation (``val/accuracy`` at the last rollout) is skipped;
an unfinished one is moved aside to ``seed<k>.incomplete<n>`` (its log is kept) and started again. Arguments after
``--`` are appended to every run's command line (e.g. ``-- --model.kl.coef 0.05``).

Our choices: every algorithm gets the same rollout geometry (P prompts x G samples, G >= 2 because GRPO needs a
group) and the same fixed KL coefficient (no KL controller); the gold signal is the verifier's greedy accuracy on
the fixed held-out set (the same questions for every seed); "final" training-time quantities (response length,
KL) are means over the last 10% of rollout batches, because single batches are noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

ALGORITHMS: dict[str, list[str]] = {
    # ``null`` lets RLSystem resolve the critic by algorithm (plain head for ppo, VIB + predict for vrpo), whatever
    # the base config says.
    "ppo": ["--model.algorithm", "ppo", "--model.critic.vib", "null", "--model.critic.aux", "null"],
    "grpo": ["--model.algorithm", "grpo", "--model.critic.vib", "null", "--model.critic.aux", "null",
             "--model.critic_lora", "null"],
    "vrpo": ["--model.algorithm", "vrpo", "--model.critic.vib", "null", "--model.critic.aux", "null"],
    "vrpo_vib_only": ["--model.algorithm", "vrpo", "--model.critic.vib", "null", "--model.critic.aux", "none"],
    "vrpo_aux_only": ["--model.algorithm", "vrpo", "--model.critic.vib", "false", "--model.critic.aux", "null"],
}

NOISES = {
    "none": "NumericVerifier (clean)",
    "flip0.2": "SymmetricFlip(p=0.2)",
    "flip0.4": "SymmetricFlip(p=0.4)",
    "asym": "AsymmetricFlip(false_positive_rate=0.3, false_negative_rate=0.1)",
    "length": "LengthBias(coef=0.02 per token)",
    "rm": "RewardModel(path=--rm-path, gold=NumericVerifier, binarize=true)",
}

VERIFIER = {"class_path": "vrpo_pl.rewards.NumericVerifier"}


def noise_reward(noise: str, seed: int, rm_path: str | None) -> dict:
    """The ``--model.reward`` value (class_path/init_args) of a noise setting; the noise is seeded by the run's seed."""
    if noise == "none":
        return VERIFIER
    if noise.startswith("flip"):
        return {"class_path": "vrpo_pl.rewards.SymmetricFlip",
                "init_args": {"base": VERIFIER, "p": float(noise[4:]), "seed": seed}}
    if noise == "asym":
        return {"class_path": "vrpo_pl.rewards.AsymmetricFlip",
                "init_args": {"base": VERIFIER, "false_positive_rate": 0.3, "false_negative_rate": 0.1, "seed": seed}}
    if noise == "length":
        return {"class_path": "vrpo_pl.rewards.LengthBias", "init_args": {"base": VERIFIER, "coef": 0.02}}
    if noise == "rm":
        if not rm_path:
            raise ValueError("noise 'rm' needs --rm-path (build one: python -m vrpo_pl.rewards.train_reward_model)")
        return {"class_path": "vrpo_pl.rewards.RewardModel",
                "init_args": {"path": str(Path(rm_path).resolve()), "gold": VERIFIER, "binarize": True}}
    raise ValueError(f"unknown noise {noise!r}; choose from {sorted(NOISES)}")


@dataclass
class Setting:
    """A benchmark size: base config, run length and the overrides that shape every run."""

    config: str
    max_steps: int
    val_every: int
    algorithms: list[str]
    noises: list[str]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    threads: int | None = None


_COMMON = ["--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false",
           "--trainer.callbacks", json.dumps([{"class_path": "vrpo_pl.callbacks.FrozenLMTargets"}])]

SETTINGS = {
    # TinyLM (random weights): checks the plumbing in seconds; its accuracy stays ~0.
    "tiny": Setting("configs/tiny.yaml", 2, 1, ["ppo", "vrpo"], ["none", "flip0.2"], [0], _COMMON + [
        "--data.prompts_per_rollout", "2", "--data.samples_per_prompt", "2", "--data.val_size", "4",
        "--data.val_batch_size", "4", "--model.ppo.epochs", "1", "--model.ppo.mini_batch_size", "2",
        "--model.ppo.micro_batch_size", "null", "--model.generation.max_new_tokens", "4",
        "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu"], threads=1),
    # SmolLM2 + LoRA on quickstart's task (chain_sum, 2 terms of 1 digit), its sampling and learning rates pinned
    # here so that editing the quickstart does not silently change the benchmark: temperature 0.7, 10 new tokens,
    # 8 prompts x 2 samples = 16 responses per rollout batch in mini-batches of 8, 8 rollout batches, 64 held-out
    # questions at rollout 0, 4 and 8. About 5-6 minutes per run on 2 CPU cores: the 6 runs take about 35 minutes.
    "small": Setting("configs/quickstart.yaml", 8, 4, ["ppo", "grpo", "vrpo"], ["none", "flip0.4"], [0], _COMMON + [
        "--model.generation.temperature", "0.7", "--model.generation.max_new_tokens", "10",
        "--model.optim.policy_lr", "3e-4", "--model.optim.critic_lr", "1e-3", "--model.ppo.epochs", "1",
        "--data.prompts_per_rollout", "8", "--data.samples_per_prompt", "2", "--model.ppo.mini_batch_size", "8",
        "--data.val_size", "64", "--data.val_batch_size", "64"]),
    # For a GPU (pass --accelerator gpu --precision bf16-mixed): 16 prompts x 4 samples, 100 rollout batches, room
    # for the length bias to show (64 new tokens), 256 held-out questions, 3 seeds.
    "full": Setting("configs/quickstart.yaml", 100, 10, list(ALGORITHMS), [n for n in NOISES if n != "rm"],
                    [0, 1, 2], _COMMON + [
        "--data.prompts_per_rollout", "16", "--data.samples_per_prompt", "4", "--data.val_size", "256",
        "--data.val_batch_size", "128", "--model.ppo.epochs", "2", "--model.ppo.mini_batch_size", "16",
        "--model.generation.max_new_tokens", "64"]),
}


@dataclass
class Run:
    algorithm: str
    noise: str
    seed: int
    dir: Path
    command: list[str]


def vrpo_command() -> list[str]:
    """The ``vrpo`` console script beside this Python, else ``python -m vrpo_pl.cli``."""
    script = Path(sys.executable).parent / "vrpo"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vrpo_pl.cli"]


def plan_runs(setting: Setting, args: argparse.Namespace, out: Path, extra: list[str]) -> list[Run]:
    """One :class:`Run` per algorithm x noise x seed, with its full command line."""
    val_every = max(d for d in range(1, min(setting.val_every, args.max_steps) + 1) if args.max_steps % d == 0)
    runs = []
    for algorithm in args.algorithms:
        for noise in args.noises:
            for seed in args.seeds:
                run_dir = out / "runs" / algorithm / noise / f"seed{seed}"
                command = [
                    *vrpo_command(), "fit", "--config", str(REPO_ROOT / setting.config), *setting.overrides,
                    *ALGORITHMS[algorithm],
                    "--model.reward", json.dumps(noise_reward(noise, seed, args.rm_path)),
                    "--seed_everything", str(seed), "--model.seed", str(seed), "--data.seed", str(seed),
                    "--trainer.max_steps", str(args.max_steps), "--trainer.val_check_interval", str(val_every),
                    "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
                    "--trainer.logger.init_args.save_dir", str(out / "runs"),
                    "--trainer.logger.init_args.name", f"{algorithm}/{noise}",
                    "--trainer.logger.init_args.version", f"seed{seed}",
                    "--trainer.default_root_dir", str(run_dir),
                ]
                for flag in ("accelerator", "precision", "devices"):
                    if getattr(args, flag) is not None:
                        command += [f"--trainer.{flag}", str(getattr(args, flag))]
                runs.append(Run(algorithm, noise, seed, run_dir, command + extra))
    return runs


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a run's event files as sorted (step, value) pairs; {} when there are none."""
    if not any(run_dir.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}


def is_complete(run_dir: Path, max_steps: int) -> bool:
    """Whether the run logged its final validation (``val/accuracy`` at step ``max_steps``)."""
    return any(step == max_steps for step, _ in read_scalars(run_dir).get("val/accuracy", []))


def execute(run: Run, max_steps: int, threads: int | None) -> tuple[Run, str]:
    """Runs one training subprocess unless already complete; returns (run, 'done'|'skipped'|'failed ...')."""
    if is_complete(run.dir, max_steps):
        return run, "skipped (complete)"
    if run.dir.exists():  # an interrupted run: keep its log beside, start again in a clean directory
        n = 1
        while run.dir.with_name(f"{run.dir.name}.incomplete{n}").exists():
            n += 1
        run.dir.rename(run.dir.with_name(f"{run.dir.name}.incomplete{n}"))
    run.dir.mkdir(parents=True)
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with open(run.dir / "console.log", "w") as log:
        log.write(shlex.join(run.command) + "\n\n")
        log.flush()
        code = subprocess.call(run.command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code != 0 or not is_complete(run.dir, max_steps):
        return run, f"failed (exit {code}, {seconds:.0f} s; see {run.dir / 'console.log'})"
    return run, f"done in {seconds:.0f} s"


# ------------------------------------------------------------------------------------------------ results
def _tail_mean(points: list[tuple[int, float]], fraction: float = 0.1) -> float:
    values = [v for _, v in points]
    k = max(1, round(fraction * len(values)))
    return statistics.fmean(values[-k:]) if values else math.nan


def summarize(runs: list[Run], max_steps: int) -> dict[tuple[str, str], dict]:
    """Per (algorithm, noise): per-seed scalars and seed-averaged curves of the complete runs."""
    table: dict[tuple[str, str], dict] = {}
    for run in runs:
        scalars = read_scalars(run.dir) if is_complete(run.dir, max_steps) else {}
        entry = table.setdefault((run.algorithm, run.noise), {"seeds": [], "curves": {}})
        if not scalars:
            continue
        acc = dict(scalars["val/accuracy"])
        entry["seeds"].append({
            "seed": run.seed, "initial_acc": acc.get(0, math.nan), "final_acc": acc[max_steps],
            "length": _tail_mean(scalars.get("response/length", [])), "kl": _tail_mean(scalars.get("kl/ref", [])),
        })
        for tag in ("val/accuracy", "response/length", "kl/ref"):
            entry["curves"].setdefault(tag, []).append(scalars.get(tag, []))
    return table


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def fmt(values: list[float], digits: int = 3) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_markdown(table, algorithms, noises, header: str) -> str:
    lines = [header, "", "## Final gold accuracy (greedy, held-out set), mean ± std over seeds", "",
             "| algorithm | " + " | ".join(noises) + " |", "|---|" + "---|" * len(noises)]
    for alg in algorithms:
        cells = [fmt([s["final_acc"] for s in table[(alg, n)]["seeds"]]) for n in noises]
        lines.append(f"| {alg} | " + " | ".join(cells) + " |")
    lines += ["", "## All runs", "",
              "| algorithm | noise | seeds | initial val/accuracy | final val/accuracy | final response/length "
              "| final kl/ref |", "|---|---|---|---|---|---|---|"]
    for alg in algorithms:
        for n in noises:
            seeds = table[(alg, n)]["seeds"]
            lines.append(f"| {alg} | {n} | {len(seeds)} | {fmt([s['initial_acc'] for s in seeds])} | "
                         f"{fmt([s['final_acc'] for s in seeds])} | {fmt([s['length'] for s in seeds], 1)} | "
                         f"{fmt([s['kl'] for s in seeds])} |")
    lines += ["", "Noise settings: " + "; ".join(f"`{n}` = {NOISES[n]}" for n in noises) + ".",
              "Final response length and KL: mean over the last 10% of rollout batches (training samples); "
              "± is the standard deviation over seeds (none with one seed).", ""]
    return "\n".join(lines)


def _mean_curve(curves: list[list[tuple[int, float]]], smooth: int = 1) -> tuple[list[int], list[float]]:
    steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves])) if curves else []
    values = [statistics.fmean(dict(c)[s] for c in curves) for s in steps]
    if smooth > 1:
        values = [statistics.fmean(values[max(0, i - smooth + 1) : i + 1]) for i in range(len(values))]
    return steps, values


def plot(table, algorithms, noises, path: Path, max_steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    colors = {a: plt.cm.tab10(i) for i, a in enumerate(algorithms)}
    # Noise = line style and marker (one noise per distinct pair), algorithm = colour.
    looks = {"none": ("-", "o"), "flip0.2": ("--", "s"), "flip0.4": (":", "^"), "asym": ("-.", "v"),
             "length": ((0, (3, 1, 1, 1, 1, 1)), "D"), "rm": ((0, (1, 1)), "x")}
    smooth = max(1, max_steps // 10)
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    ax = axes[0, 0]
    width = 0.8 / len(algorithms)
    for i, alg in enumerate(algorithms):
        stats = [mean_std([s["final_acc"] for s in table[(alg, n)]["seeds"]]) for n in noises]
        xs = [j + (i - (len(algorithms) - 1) / 2) * width for j in range(len(noises))]
        bars = ax.bar(xs, [m for m, _ in stats], width, color=colors[alg], label=alg)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, label_type="center", rotation=90, color="white")
        with_std = [(x, m, sd) for x, (m, sd) in zip(xs, stats, strict=True) if not math.isnan(sd)]
        if with_std:
            ax.errorbar(*zip(*with_std, strict=True), fmt="none", ecolor="black", capsize=3, lw=1)
    ax.set_xticks(range(len(noises)), noises)
    ax.set_ylim(0, 1.15)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set(title="Final gold accuracy (mean ± std over seeds)", xlabel="training-reward noise", ylabel="val/accuracy")
    ax.legend(fontsize=8, loc="upper center", ncol=min(len(algorithms), 5))
    panels = [(axes[0, 1], "val/accuracy", "Gold accuracy (greedy, held-out)", 1),
              (axes[1, 0], "response/length", f"Response length (tokens, moving mean of {smooth})", smooth),
              (axes[1, 1], "kl/ref", f"KL(pi || pi_ref) per sequence (moving mean of {smooth})", smooth)]
    for ax, tag, title, k in panels:
        for alg in algorithms:
            for n in noises:
                curves = [c for c in table[(alg, n)]["curves"].get(tag, []) if c]
                if curves:
                    steps, values = _mean_curve(curves, k)
                    ax.plot(steps, values, color=colors[alg], linestyle=looks[n][0], lw=1.3, marker=looks[n][1],
                            ms=3.5, markevery=max(1, len(steps) // 8))
        ax.set(title=title, xlabel="rollout batches", ylabel=tag)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0, 1].set_ylim(0, 1.05)
    handles = [Line2D([], [], color=colors[a], lw=2, label=a) for a in algorithms]
    handles += [Line2D([], [], color="gray", linestyle=looks[n][0], marker=looks[n][1], ms=3.5, lw=1.3,
                       label=f"noise: {n}") for n in noises]
    axes[0, 1].legend(handles=handles, fontsize=8, ncol=2)
    fig.suptitle("Robustness to noisy rewards: curves are means over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="SmolLM2 + LoRA sized for 2 CPU cores (< 1 hour)")
    size.add_argument("--tiny", action="store_true", help="TinyLM, seconds per run (tests, smoke runs)")
    p.add_argument("--out", type=Path, required=True, help="output directory (runs/, results.md, robustness.png)")
    p.add_argument("--algorithms", nargs="+", choices=list(ALGORITHMS), help="default: the setting's")
    p.add_argument("--noises", nargs="+", choices=list(NOISES), help="default: the setting's (+ rm with --rm-path)")
    p.add_argument("--seeds", nargs="+", type=int, help="default: the setting's")
    p.add_argument("--max-steps", type=int, help="rollout batches per run (default: the setting's)")
    p.add_argument("--rm-path", help="reward-model directory for the 'rm' noise")
    p.add_argument("--accelerator", help="--trainer.accelerator for every run (e.g. gpu)")
    p.add_argument("--precision", help="--trainer.precision for every run (e.g. bf16-mixed)")
    p.add_argument("--devices", help="--trainer.devices for every run")
    p.add_argument("--threads", type=int, help="OMP threads per run (default: the setting's, else torch's)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (a GPU fits several 135M runs)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and whether each run is complete")
    p.add_argument("--report-only", action="store_true", help="only rebuild results.md and robustness.png")
    args = p.parse_args(argv)
    args.setting = "tiny" if args.tiny else "small" if args.small else "full"
    setting = SETTINGS[args.setting]
    args.algorithms = args.algorithms or setting.algorithms
    args.noises = args.noises or setting.noises + (["rm"] if args.rm_path and "rm" not in setting.noises else [])
    args.seeds = args.seeds if args.seeds is not None else setting.seeds
    args.max_steps = args.max_steps or setting.max_steps
    args.threads = args.threads if args.threads is not None else setting.threads
    if "rm" in args.noises and not args.rm_path:
        p.error("--noises rm needs --rm-path")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    setting, out = SETTINGS[args.setting], args.out.resolve()
    runs = plan_runs(setting, args, out, extra)
    print(f"{len(runs)} runs ({args.setting}: {setting.config}, {args.max_steps} rollout batches each) -> {out}")
    if args.dry_run:
        for run in runs:
            state = "complete" if is_complete(run.dir, args.max_steps) else "to run"
            print(f"# {run.algorithm} / {run.noise} / seed {run.seed}: {state}\n{shlex.join(run.command)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.report_only:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            jobs = [pool.submit(execute, run, args.max_steps, args.threads) for run in runs]
            for done, job in enumerate(jobs, 1):
                run, status = job.result()
                elapsed = time.perf_counter() - start
                eta = elapsed / done * (len(runs) - done)
                print(f"[{done}/{len(runs)}] {run.algorithm} / {run.noise} / seed {run.seed}: {status} "
                      f"(elapsed {elapsed / 60:.1f} min, about {eta / 60:.1f} min left)", flush=True)
                if status.startswith("failed"):
                    failed.append(run)
    table = summarize(runs, args.max_steps)
    header = (f"# Robustness benchmark ({args.setting})\n\nBase config `{setting.config}`, "
              f"{args.max_steps} rollout batches per run, seeds {args.seeds}. Runs: `{out / 'runs'}`.\n\n"
              f"Command: `python benchmarks/robustness.py {shlex.join(argv if argv is not None else sys.argv[1:])}`")
    text = results_markdown(table, args.algorithms, args.noises, header)
    missing = [f"{r.algorithm}/{r.noise}/seed{r.seed}" for r in runs if not is_complete(r.dir, args.max_steps)]
    if missing:
        text += "\nMissing (failed or not run): " + ", ".join(missing) + "\n"
    (out / "results.md").write_text(text)
    plot(table, args.algorithms, args.noises, out / "robustness.png", args.max_steps)
    print(text)
    print(f"wrote {out / 'results.md'} and {out / 'robustness.png'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
