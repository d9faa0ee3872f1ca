"""Robustness benchmark: gold accuracy of PPO, GRPO and VRPO (and VRPO's ablations) as the training reward degrades.

Sweeps algorithm x noise x seed. Every run is its own ``vrpo fit --config <base> <overrides>`` subprocess with its
own TensorBoard directory ``OUT/runs/<algorithm>/<noise>/seed<k>`` (plus its ``console.log`` and
``val_outcomes.jsonl``: every validation's per-question gold outcome); nothing is overwritten. The runs are then
read back (:mod:`vrpo_pl.study`) into ``OUT/results.md`` and ``OUT/robustness.png``: final and best gold accuracy
with 95% bootstrap intervals over seeds and questions, the paired differences VRPO - PPO and VRPO - GRPO, and
curves of gold accuracy, response length, KL and the critic's explained variance.

    python benchmarks/robustness.py --medium --out runs/bench/robustness_medium \
        --ledger benchmarks/results/robustness_medium                                          # 2 CPU cores
    python benchmarks/robustness.py --small --out runs/bench/robustness_small                  # < 1 h
    python benchmarks/robustness.py --out runs/bench/robustness --accelerator gpu --jobs 4     # the full grid
    python benchmarks/robustness.py --tiny --out /tmp/robustness_tiny                          # TinyLM, seconds
    python benchmarks/robustness.py --medium --noises none vote --dry-run                      # print the commands

To wind a study down without losing work, touch ``OUT/STOP`` (or start it with ``--stop-after MINUTES``): the runs
in flight finish and no new one starts; the next invocation goes on from there.

Resume-safe: a run whose events already hold the final validation (``val/accuracy`` at the last rollout) is skipped;
an unfinished one is moved aside to ``seed<k>.incomplete<n>`` (its log is kept) and started again. With ``--ledger
DIR`` every finished run is also kept as one small JSON record ``DIR/<algorithm>/<noise>/seed<k>.json`` (scalars,
per-question outcomes, the CPU, dtype, seconds and commit it ran with; :func:`vrpo_pl.study.save_result`): a run
with a record is complete even where its directory is gone, so a study committed record by record resumes on
another machine or a fresh clone, and its report is rebuilt from the records alone. Arguments after
``--`` are appended to every run's command line (e.g. ``-- --model.kl.coef 0.05``).

Paired design: for a seed, every algorithm sees the same prompts (``--data.seed``) and the same noise draws (the
noise generator's seed), and every run is validated on the same held-out questions, so differences between
algorithms are taken per seed and question. Our choices: the same rollout geometry (P prompts x G samples) and the
same fixed KL coefficient for every algorithm (no KL controller); "final" training-time quantities (response length,
KL) are means over the last 10% of rollout batches. The ablations (VRPO's VIB alone and auxiliary loss alone, GRPO
with the flip-rate correction) run at one noise level (``Setting.ablation_noise``). VRPO's variants (``VARIANTS``:
the ``weight`` form, key tokens only, surprisal key tokens, a tighter bottleneck) join them there with
``--variants``, or run by name; ``OUT/results.md`` reports the runs of its own invocation, so the whole study's
report is ``--medium --rm-path DIR --variants --report-only`` (complete runs are skipped, not run again).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
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
    # GRPO on the unbiased reward r^ = (r~ - rho+) / (1 - rho+ - rho-) for the noise's known flip rates
    # (Noise-corrected GRPO, arXiv 2510.18924); defined for the flip noises only.
    "grpo_corrected": ["--model.algorithm", "grpo", "--model.critic.vib", "null", "--model.critic.aux", "null",
                       "--model.critic_lora", "null"],
    # VRPO's variants inside the paper's description (issue item "find out why"; run them by name with --algorithms,
    # none is in a setting's default grid). Key tokens are the FrozenLMTargets callback's: entropy >= the batch's
    # 0.8 quantile unless the variant says otherwise.
    # the `weight` form: no prediction heads, the value loss weighted w_t = 1 + alpha * key_t (alpha = 1)
    "vrpo_weight": ["--model.algorithm", "vrpo", "--model.critic.vib", "null", "--model.critic.aux", "weight"],
    # the `predict` heads regress the frozen LM's entropy and surprisal on key tokens only
    "vrpo_key_only": ["--model.algorithm", "vrpo", "--model.critic.vib", "null", "--model.critic.aux", "predict",
                      "--model.critic.aux_key_only", "true"],
    # the `weight` form with key tokens marked by surprisal (the frozen LM's per-token perplexity) instead of entropy
    "vrpo_weight_surprisal": ["--model.algorithm", "vrpo", "--model.critic.vib", "null", "--model.critic.aux",
                              "weight", "--trainer.callbacks", json.dumps(
                                  [{"class_path": "vrpo_pl.callbacks.FrozenLMTargets",
                                    "init_args": {"key_signal": "surprisal"}},
                                   {"class_path": "vrpo_pl.callbacks.ValidationOutcomes"}])],
    # a 10x tighter bottleneck: beta = 1e-3, method.md's first default (ours is 1e-4, where the critic fits)
    "vrpo_beta1e-3": ["--model.algorithm", "vrpo", "--model.critic.vib", "null", "--model.critic.aux", "null",
                      "--model.critic.beta", "1e-3"],
}
VARIANTS = ["vrpo_weight", "vrpo_key_only", "vrpo_weight_surprisal", "vrpo_beta1e-3"]

# name -> (description, Youden's J = TPR - FPR of the training reward against the gold one, where it is fixed)
NOISES = {
    "none": ("NumericVerifier (clean)", 1.0),
    "flip0.2": ("SymmetricFlip(p=0.2)", 0.6),
    "flip0.3": ("SymmetricFlip(p=0.3)", 0.4),
    "flip0.4": ("SymmetricFlip(p=0.4)", 0.2),
    "flip0.45": ("SymmetricFlip(p=0.45)", 0.1),
    "random": ("SymmetricFlip(p=0.5): the random-reward control, no information", 0.0),
    "asym": ("AsymmetricFlip(false_positive_rate=0.3, false_negative_rate=0.1): false-positive-heavy", 0.6),
    "vote": ("MajorityVote (TTRL pseudo-labels: the majority answer of the prompt's samples)", None),
    "rm": ("RewardModel(path=--rm-path, gold=NumericVerifier, binarize=true)", None),
    "length": ("LengthBias(coef=0.02 per token)", None),
}

VERIFIER = {"class_path": "vrpo_pl.rewards.NumericVerifier"}
FLIP_RATES = {"asym": (0.3, 0.1), "random": (0.5, 0.5)}  # (rho+, rho-); flipP: (P, P)


def flip_rates(noise: str) -> tuple[float, float] | None:
    """(false-positive, false-negative) rates of a flip noise, None for the others."""
    if noise.startswith("flip"):
        return float(noise[4:]), float(noise[4:])
    return FLIP_RATES.get(noise)


def noise_reward(noise: str, seed: int, rm_path: str | None, algorithm: str = "") -> dict:
    """The ``--model.reward`` value (class_path/init_args) of a noise setting; the noise is seeded by the run's seed
    (so every algorithm of a seed draws the same noise). ``grpo_corrected`` wraps it in the flip-rate correction."""
    rates = flip_rates(noise)
    if noise == "none":
        reward = VERIFIER
    elif rates is not None and noise != "asym":
        reward = {"class_path": "vrpo_pl.rewards.SymmetricFlip",
                  "init_args": {"base": VERIFIER, "p": rates[0], "seed": seed}}
    elif noise == "asym":
        reward = {"class_path": "vrpo_pl.rewards.AsymmetricFlip",
                  "init_args": {"base": VERIFIER, "false_positive_rate": rates[0], "false_negative_rate": rates[1],
                                "seed": seed}}
    elif noise == "vote":
        reward = {"class_path": "vrpo_pl.rewards.MajorityVote", "init_args": {"gold": VERIFIER}}
    elif noise == "length":
        reward = {"class_path": "vrpo_pl.rewards.LengthBias", "init_args": {"base": VERIFIER, "coef": 0.02}}
    elif noise == "rm":
        if not rm_path:
            raise ValueError("noise 'rm' needs --rm-path (build one: python -m vrpo_pl.rewards.train_reward_model)")
        reward = {"class_path": "vrpo_pl.rewards.RewardModel",
                  "init_args": {"path": str(Path(rm_path).resolve()), "gold": VERIFIER, "binarize": True}}
    else:
        raise ValueError(f"unknown noise {noise!r}; choose from {sorted(NOISES)}")
    if algorithm == "grpo_corrected":
        if rates is None or sum(rates) >= 1:
            raise ValueError(f"grpo_corrected needs a flip noise with rho+ + rho- < 1, not {noise!r}")
        reward = {"class_path": "vrpo_pl.rewards.FlipRateCorrection",
                  "init_args": {"base": reward, "false_positive_rate": rates[0], "false_negative_rate": rates[1]}}
    return reward


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
    """OMP threads per run (None: torch's default, one per core)."""
    jobs: int = 1
    """Runs at once (``--jobs`` overrides)."""
    ablation_noise: str | None = None
    """The noise at which the ablations (VRPO's VIB alone and auxiliary alone, GRPO with the flip-rate correction)
    also run."""
    ablations: list[str] = field(default_factory=lambda: ["vrpo_vib_only", "vrpo_aux_only", "grpo_corrected"])


# chain_sum with 2-3 terms of 1 digit: ~1,450 distinct questions, room for 256 held-out ones (2 terms: only 200).
WIDE_TASK = json.dumps({"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1})

_COMMON = ["--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false",
           "--trainer.callbacks", json.dumps([{"class_path": "vrpo_pl.callbacks.FrozenLMTargets"},
                                              {"class_path": "vrpo_pl.callbacks.ValidationOutcomes"}])]

# The numerics that the small and medium records were made with (docs/results.md), pinned so that seeds added later
# stay comparable: mini-batches of shuffled rows, adapters multiplying in float32 and tokens drawn by
# torch.multinomial, the defaults before 2026-12-05 (now whole prompt groups, the input's dtype and inverse transform
# sampling: --model.ppo.shuffle, --model.lora.compute, --model.generation.draw).
_STUDY_NUMERICS = ["--model.ppo.shuffle", "rows", "--model.lora.compute", "float32",
                   "--model.critic_lora.compute", "float32", "--model.generation.draw", "multinomial"]

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
    "small": Setting("configs/quickstart.yaml", 8, 4, ["ppo", "grpo", "vrpo"], ["none", "flip0.4"], [0], _COMMON +
                     _STUDY_NUMERICS + [
        "--model.generation.temperature", "0.7", "--model.generation.max_new_tokens", "10",
        "--model.optim.policy_lr", "3e-4", "--model.optim.critic_lr", "1e-3", "--model.ppo.epochs", "1",
        "--data.prompts_per_rollout", "8", "--data.samples_per_prompt", "2", "--model.ppo.mini_batch_size", "8",
        "--data.val_size", "64", "--data.val_batch_size", "64"]),
    # The study with power on 2 CPU cores (fast path: bf16 base weights where the CPU has bf16 units): quickstart's
    # task widened to 2-3 terms of 1 digit (2 terms have only 200 distinct questions, fewer than 256 held out; 2-3
    # have ~1,450) and its sampling (temperature 0.7) with a 16-token budget, where the instruct model's greedy
    # answers are not cut at the start; 8 prompts x 4 samples (GRPO groups and majority votes of 4), one PPO epoch
    # in mini-batches of 16, 30 rollout batches, 256 held-out questions at rollouts 0, 10, 20 and 30; 3 paired seeds.
    # Two runs at once with one thread each (docs/performance.md, "Threads and OpenMP's wait policy"): VRPO's
    # rollout batch took 17.8 s in each of two 1-thread runs side by side, against 12.5 s for one 2-thread run with
    # spinning OpenMP threads and 22.3 s with passive ones (Intel Xeon with AMX, 2 cores, 2026-12-04): 1.4x-2.5x the
    # work, and safe when something else shares the cores, where spinning threads collapse.
    "medium": Setting("configs/quickstart.yaml", 30, 10, ["ppo", "grpo", "vrpo"],
                      ["none", "flip0.3", "flip0.45", "asym", "vote", "random"], [0, 1, 2], _COMMON +
                      _STUDY_NUMERICS + [
        "--model.generation.temperature", "0.7", "--model.generation.max_new_tokens", "16",
        "--model.optim.policy_lr", "3e-4", "--model.optim.critic_lr", "1e-3", "--model.ppo.epochs", "1",
        "--data.prompts_per_rollout", "8", "--data.samples_per_prompt", "4", "--model.ppo.mini_batch_size", "16",
        "--data.val_size", "256", "--data.val_batch_size", "128", "--data.source.init_args.params", WIDE_TASK],
        ablation_noise="flip0.3", threads=1, jobs=2),
    # For a GPU (pass --accelerator gpu --precision bf16-mixed): 16 prompts x 4 samples, 100 rollout batches, room
    # for the length bias to show (64 new tokens), 256 held-out questions, 3 seeds.
    "full": Setting("configs/quickstart.yaml", 100, 10, ["ppo", "grpo", "vrpo"], [n for n in NOISES if n != "rm"],
                    [0, 1, 2], ablation_noise="flip0.3", overrides=_COMMON + [
        "--data.prompts_per_rollout", "16", "--data.samples_per_prompt", "4", "--data.val_size", "256",
        "--data.val_batch_size", "128", "--model.ppo.epochs", "2", "--model.ppo.mini_batch_size", "16",
        "--model.generation.max_new_tokens", "64", "--data.source.init_args.params", WIDE_TASK]),
}


@dataclass
class Run:
    algorithm: str
    noise: str
    seed: int
    dir: Path
    command: list[str]
    record: Path | None = None
    """Its ledger record (``--ledger``), or None."""


def vrpo_command() -> list[str]:
    """The ``vrpo`` console script beside this Python, else ``python -m vrpo_pl.cli``."""
    script = Path(sys.executable).parent / "vrpo"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vrpo_pl.cli"]


def plan_pairs(setting: Setting, args: argparse.Namespace) -> list[tuple[str, str]]:
    """(algorithm, noise) pairs: the algorithms x the noises, then at the setting's ablation noise the ablations
    (unless ``--algorithms`` is given) and, with ``--variants``, VRPO's variants; ``grpo_corrected`` only where the
    noise has known flip rates."""
    pairs = [(a, n) for a in args.algorithms for n in args.noises]
    if setting.ablation_noise in args.noises:
        added = ([] if args.algorithms_given else setting.ablations) + (VARIANTS if args.variants else [])
        pairs += [(a, setting.ablation_noise) for a in added if a not in args.algorithms]
    return [(a, n) for a, n in pairs
            if a != "grpo_corrected" or (flip_rates(n) is not None and sum(flip_rates(n)) < 1)]


def plan_runs(setting: Setting, args: argparse.Namespace, out: Path, extra: list[str]) -> list[Run]:
    """One :class:`Run` per (algorithm, noise) pair x seed, with its full command line."""
    val_every = max(d for d in range(1, min(setting.val_every, args.max_steps) + 1) if args.max_steps % d == 0)
    runs = []
    # Noise by noise, seed by seed: an interrupted study has whole paired cells (every algorithm of a seed) for the
    # noises it reached, rather than every noise for some algorithms only.
    pairs = plan_pairs(setting, args)
    order = [(a, n, seed) for n in dict.fromkeys(n for _, n in pairs) for seed in args.seeds
             for a, n2 in pairs if n2 == n]
    for algorithm, noise, seed in order:
        run_dir = out / "runs" / algorithm / noise / f"seed{seed}"
        command = [
            *vrpo_command(), "fit", "--config", str(REPO_ROOT / setting.config), *setting.overrides,
            *ALGORITHMS[algorithm],
            "--model.reward", json.dumps(noise_reward(noise, seed, args.rm_path, algorithm)),
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
        record = None if args.ledger is None else args.ledger / algorithm / noise / f"seed{seed}.json"
        runs.append(Run(algorithm, noise, seed, run_dir, command + extra, record))
    return runs


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a run's event files as sorted (step, value) pairs; {} when there are none."""
    if not any(run_dir.glob("events.out.tfevents.*")):
        return {}
    from vrpo_pl.summary import read_scalars as read

    return read(run_dir)


def _finished(scalars: dict[str, list[tuple[int, float]]], max_steps: int) -> bool:
    return any(step == max_steps for step, _ in scalars.get("val/accuracy", []))


def recorded(run: Run, max_steps: int):
    """``run``'s ledger record as a :class:`vrpo_pl.study.RunResult` if it exists and holds the final validation,
    else None."""
    if run.record is None or not run.record.exists():
        return None
    from vrpo_pl.study import load_result

    result = load_result(run.record)
    return result if _finished(result.scalars, max_steps) else None


def is_complete(run: Run, max_steps: int) -> bool:
    """Whether the run logged its final validation (``val/accuracy`` at step ``max_steps``), in its directory's
    events or in its ledger record."""
    return recorded(run, max_steps) is not None or _finished(read_scalars(run.dir), max_steps)


def machine() -> dict:
    """Where a run ran: the CPU's model name, whether it has bf16 matrix units, torch and the commit."""
    import torch

    from vrpo_pl.models import cpu_has_bf16

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    return {"cpu": cpu, "cpu_bf16": cpu_has_bf16(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "commit": commit.stdout.strip() or "unknown", "date": time.strftime("%Y-%m-%d")}


def run_dtype(run: Run) -> str:
    """The weights' dtype ``run`` computed in: its saved ``config.yaml``'s ``model.dtype``, with ``auto`` resolved as
    the run resolved it (:func:`vrpo_pl.models.resolve_dtype`: bfloat16 only when every trained model uses LoRA and
    bf16 is fast on the device); "unknown" without the file."""
    import torch
    import yaml

    from vrpo_pl.models import all_trained_by_lora, resolve_dtype

    path = run.dir / "config.yaml"
    if not path.exists():
        return "unknown"
    config = yaml.safe_load(path.read_text())
    model, trainer = config.get("model") or {}, config.get("trainer") or {}
    lora_everywhere = all_trained_by_lora(model.get("algorithm"), model.get("lora"), model.get("critic_lora"))
    gpu = str(trainer.get("accelerator", "auto")) in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    return resolve_dtype(model.get("dtype", "auto"), lora_everywhere, torch.device("cuda" if gpu else "cpu"))


def write_record(run: Run, seconds: float | None, threads: int | None = None) -> None:
    """Saves the finished ``run``'s record to the ledger (no-op without ``--ledger``): the machine, the dtype the
    run resolved, the OMP threads it ran with (``--threads``; None: torch's default or not known), its seconds
    and command."""
    if run.record is None:
        return
    from vrpo_pl.study import read_run, save_result

    meta = machine()
    meta["threads"] = threads  # None: not known (a run found complete, or torch's default of the run's process)
    save_result(read_run(run.dir, run.algorithm, run.noise, run.seed), run.record,
                {**meta, "dtype": run_dtype(run), "seconds": None if seconds is None else round(seconds),
                 "command": shlex.join(run.command)})


def stop_reason(out: Path, deadline: float | None) -> str | None:
    """Why no new run may start: ``OUT/STOP`` exists, or ``--stop-after`` minutes have passed; else None."""
    if (out / "STOP").exists():
        return f"{out / 'STOP'} exists (delete it to go on)"
    if deadline is not None and time.monotonic() >= deadline:
        return "--stop-after minutes have passed"
    return None


def execute(run: Run, max_steps: int, threads: int | None, out: Path | None = None,
            deadline: float | None = None) -> tuple[Run, str]:
    """Runs one training subprocess unless already complete, or unless a stop was asked for (:func:`stop_reason`;
    runs in flight finish); returns (run, 'done'|'skipped ...'|'not started ...'|'failed ...')."""
    if recorded(run, max_steps) is not None:
        return run, "skipped (recorded)"
    if _finished(read_scalars(run.dir), max_steps):
        write_record(run, None)  # finished in an earlier invocation: its threads are not known here
        return run, "skipped (complete)"
    reason = None if out is None else stop_reason(out, deadline)
    if reason is not None:
        return run, f"not started: {reason}"
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
    if code != 0 or not _finished(read_scalars(run.dir), max_steps):
        return run, f"failed (exit {code}, {seconds:.0f} s; see {run.dir / 'console.log'})"
    write_record(run, seconds, threads)
    return run, f"done in {seconds:.0f} s"


# ------------------------------------------------------------------------------------------------ results
def collect(runs: list[Run], max_steps: int) -> dict[tuple[str, str], list]:
    """The complete runs read back (:class:`vrpo_pl.study.RunResult`), grouped by (algorithm, noise): from the
    ledger record where there is one, else from the run directory."""
    from vrpo_pl.study import read_run

    results: dict[tuple[str, str], list] = {}
    for run in runs:
        results.setdefault((run.algorithm, run.noise), [])
        result = recorded(run, max_steps)
        if result is None and _finished(read_scalars(run.dir), max_steps):
            result = read_run(run.dir, run.algorithm, run.noise, run.seed)
        if result is not None and result.outcomes:
            results[(run.algorithm, run.noise)].append(result)
    return results


def _noise_label(noise: str) -> str:
    description, youden = NOISES[noise]
    return f"`{noise}` = {description}" + ("" if youden is None else f" (J = {youden:.1f})")


def results_markdown(results: dict, noises: list[str], header: str) -> str:
    """Tables: final gold accuracy with intervals, paired differences of VRPO against PPO and GRPO, every cell's
    details, and the ablations."""
    from vrpo_pl.study import cell, outcome_matrix, paired, pooled_paired

    cells = {key: cell(runs) for key, runs in results.items() if runs}
    algorithms = list(dict.fromkeys(a for a, _ in results))
    lines = [header, "", "## Final gold accuracy (greedy, held-out set)", "",
             "Mean over seeds and questions, 95% bootstrap interval over both in brackets.", "",
             "| algorithm | " + " | ".join(noises) + " |", "|---|" + "---|" * len(noises)]
    for alg in algorithms:
        row = [f"{cells[(alg, n)].final.mean:.3f} [{cells[(alg, n)].final.low:.3f}, {cells[(alg, n)].final.high:.3f}]"
               if (alg, n) in cells else "" for n in noises]
        if any(row):
            lines.append(f"| {alg} | " + " | ".join(row) + " |")
    lines += ["", "## Paired differences (same seeds, same questions)", "",
              "| noise | VRPO - PPO, final | VRPO - GRPO, final | VRPO - PPO, best | VRPO - GRPO, best |",
              "|---|---|---|---|---|"]
    for n in noises:
        vrpo = results.get(("vrpo", n), [])
        diffs = [paired(vrpo, results.get((base, n), []), at) if vrpo else None
                 for at in ("final", "best") for base in ("ppo", "grpo")]
        lines.append(f"| {n} | " + " | ".join("" if d is None else str(d) for d in diffs) + " |")
    noisy = [n for n in noises if n != "none" and results.get(("vrpo", n))]
    if len(noisy) > 1:  # the average over the noisy cells: one question asked with every run behind it
        diffs = [pooled_paired([(results[("vrpo", n)], results.get((base, n), [])) for n in noisy], at)
                 for at in ("final", "best") for base in ("ppo", "grpo")]
        shared = [len({r.seed for r in results[("vrpo", n)]} & {r.seed for r in results.get(("ppo", n), [])})
                  for n in noisy]
        lines.append(f"| **every noisy cell, pooled** ({sum(k > 0 for k in shared)} cells, {sum(shared)} seeds "
                     "paired with PPO) | "
                     + " | ".join("" if d is None else f"**{d}**" for d in diffs) + " |")
    lines += ["", "## Per seed (final gold accuracy; a difference that changes sign from seed to seed is not a "
              "method's)", "", "| noise | seed | " + " | ".join(algorithms) + " | VRPO - PPO | VRPO - GRPO |",
              "|---|---|" + "---|" * (len(algorithms) + 2)]
    for n in noises:
        by_seed = {(a, r.seed): r for a in algorithms for r in results.get((a, n), [])}
        for seed in sorted({seed for _, seed in by_seed}):
            final = {a: float(outcome_matrix([by_seed[(a, seed)]], "final").mean())
                     for a in algorithms if (a, seed) in by_seed}
            diffs = [f"{final['vrpo'] - final[b]:+.3f}" if "vrpo" in final and b in final else ""
                     for b in ("ppo", "grpo")]
            lines.append(f"| {n} | {seed} | " + " | ".join(f"{final[a]:.3f}" if a in final else "" for a in algorithms)
                         + " | " + " | ".join(diffs) + " |")
    lines += ["", "## Every cell", "",
              "| algorithm | noise | seeds | initial | final | best | response length | KL | explained variance "
              "| abs adv key / other |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (alg, n), c in cells.items():
        lines.append(
            f"| {alg} | {n} | {len(c.seeds)} | {c.initial.mean:.3f} | {c.final.mean:.3f} [{c.final.low:.3f}, "
            f"{c.final.high:.3f}] | {c.best.mean:.3f} | {c.length:.1f} | {c.kl:.3f} | {c.explained_variance:.3f} | "
            f"{c.abs_adv_key:.2f} / {c.abs_adv_other:.2f} |".replace("nan", "—"))
    extra = ("vrpo_vib_only", "vrpo_aux_only", "grpo_corrected", *VARIANTS)
    ablations = sorted({n for a, n in results if a in extra and results[(a, n)]})
    for n in ablations:
        lines += ["", f"## Ablations and variants at `{n}` (paired differences, final)", "",
                  "| algorithm | final accuracy | minus PPO | minus VRPO |", "|---|---|---|---|"]
        for alg in algorithms:
            if results.get((alg, n)) and alg != "ppo":
                d = [paired(results[(alg, n)], results.get((b, n), [])) if alg != b else None for b in ("ppo", "vrpo")]
                lines.append(f"| {alg} | {cells[(alg, n)].final.mean:.3f} | "
                             + " | ".join("" if x is None else str(x) for x in d) + " |")
    lines += ["", "Noise settings: " + "; ".join(_noise_label(n) for n in noises) + ".",
              "Best: each run's most accurate validation (biased upward; a reference, not a result). Response length "
              "and KL: mean over the last 10% of rollout batches; explained variance: median over the run's rollout "
              "batches (a batch whose returns barely vary gives a huge negative value that a mean would let "
              "dominate), averaged over seeds; |advantage| on key tokens (as FrozenLMTargets marks them: guide entropy "
              "in the batch's top 20%, surprisal for vrpo_weight_surprisal) against the others: means over the run.",
              ""]
    return "\n".join(lines)


def plot(results: dict, noises: list[str], path: Path) -> None:
    """``path``: final accuracy with intervals and the paired differences; ``path``'s ``_curves`` sibling: gold
    accuracy, response length, KL and explained variance over rollout batches, one column per noise. Noises without
    a finished run yet (a study under way) are left out of both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vrpo_pl.study import CURVES, cell, mean_curve, paired, pooled_paired

    # Only what has finished runs (a study under way), in plan order.
    algorithms = list(dict.fromkeys(a for (a, n), runs in results.items() if runs)) or list(
        dict.fromkeys(a for a, _ in results))
    noises = [n for n in noises if any(results.get((a, n)) for a in algorithms)] or noises[:1]
    colors = {a: plt.cm.tab20(i % 20) for i, a in enumerate(algorithms)}  # 6 study algorithms + 4 variants
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(15, 5))
    width = 0.8 / max(len(algorithms), 1)
    for i, alg in enumerate(algorithms):
        for j, n in enumerate(noises):
            if not results.get((alg, n)):
                continue
            c = cell(results[(alg, n)]).final
            x = j + (i - (len(algorithms) - 1) / 2) * width
            labelled = alg in ax.get_legend_handles_labels()[1]
            ax.bar(x, c.mean, width, color=colors[alg], label=None if labelled else alg)
            ax.errorbar(x, c.mean, [[c.mean - c.low], [c.high - c.mean]], fmt="none", ecolor="black", capsize=2, lw=1)
    ax.set_xticks(range(len(noises)), noises)
    ax.set(ylim=(0, 1), ylabel="final gold accuracy",
           title="Final gold accuracy (95% interval over seeds and questions)")
    ax.legend(fontsize=8)
    noisy = [n for n in noises if n != "none" and results.get(("vrpo", n))]
    show_pooled = len(noisy) > 1  # a pooled point only says more than the cells when it pools several
    for k, base in enumerate(("ppo", "grpo")):
        xs, ds = [], []
        for j, n in enumerate(noises):
            d = paired(results.get(("vrpo", n), []), results.get((base, n), [])) if results.get(("vrpo", n)) else None
            if d is not None:
                xs.append(j + (k - 0.5) * 0.3)
                ds.append(d)
        pooled = pooled_paired([(results[("vrpo", n)], results.get((base, n), [])) for n in noisy]) \
            if show_pooled else None
        if pooled is not None:  # the noisy cells pooled, right of the cells
            xs.append(len(noises) + (k - 0.5) * 0.3)
            ds.append(pooled)
        if ds:
            bx.errorbar(xs, [d.mean for d in ds], [[d.mean - d.low for d in ds], [d.high - d.mean for d in ds]],
                        fmt="o", capsize=3, label=f"VRPO - {base.upper()}")
    bx.axhline(0, color="gray", lw=1)
    bx.set_xticks(range(len(noises) + show_pooled), noises + (["noisy cells\npooled"] if show_pooled else []))
    bx.set_xlim(-0.6, len(noises) + show_pooled - 0.4)  # each cell's points beside its tick, also with one cell
    bx.set(ylabel="paired difference in final gold accuracy", title="VRPO against the baselines (95% interval)")
    if bx.get_legend_handles_labels()[1]:
        bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(len(CURVES), len(noises), figsize=(max(3.2 * len(noises), 6.4), 2.6 * len(CURVES)),
                             squeeze=False, sharex=True)
    for j, n in enumerate(noises):
        for i, tag in enumerate(CURVES):
            axis = axes[i, j]
            for alg in algorithms:
                for run in results.get((alg, n), []):  # every run, thin, under the mean over seeds
                    points = run.scalars.get(tag, [])
                    if len(points) > 1:
                        axis.plot([s for s, _ in points], [v for _, v in points], color=colors[alg], lw=0.5, alpha=0.3)
                steps, values = mean_curve(results.get((alg, n), []), tag)
                if steps:
                    axis.plot(steps, values, color=colors[alg], lw=1.4, label=alg)
            axis.grid(alpha=0.3)
            if i == 0:
                axis.set_title(n, fontsize=9)
            if j == 0:
                axis.set_ylabel(tag, fontsize=8)
            if tag == "value/explained_variance":
                axis.set_ylim(-0.5, 1)
    handles = {}  # one legend for the figure: an algorithm may appear under some noises only (the ablations)
    for axis in axes.flat:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=min(len(handles), 8), fontsize=8,
                   bbox_to_anchor=(0.5, 0.965), frameon=False)
    for axis in axes[-1]:
        axis.set_xlabel("rollout batches", fontsize=8)
    fig.suptitle("Means over seeds (thick) and every run (thin), per noise (columns)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path.with_name(path.stem + "_curves.png"), dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="SmolLM2 + LoRA sized for 2 CPU cores (< 1 hour)")
    size.add_argument("--medium", action="store_true", help="the study with power, sized for 2 CPU cores")
    size.add_argument("--tiny", action="store_true", help="TinyLM, seconds per run (tests, smoke runs)")
    p.add_argument("--out", type=Path, required=True, help="output directory (runs/, results.md, robustness.png)")
    p.add_argument("--algorithms", nargs="+", choices=list(ALGORITHMS), help="default: the setting's")
    p.add_argument("--noises", nargs="+", choices=list(NOISES), help="default: the setting's (+ rm with --rm-path)")
    p.add_argument("--seeds", nargs="+", type=int, help="default: the setting's")
    p.add_argument("--variants", action="store_true", help=f"also VRPO's variants ({', '.join(VARIANTS)}) at the "
                   "setting's ablation noise (--medium and the full grid: flip0.3)")
    p.add_argument("--max-steps", type=int, help="rollout batches per run (default: the setting's)")
    p.add_argument("--rm-path", help="reward-model directory for the 'rm' noise")
    p.add_argument("--ledger", type=Path, help="keep each finished run as DIR/<algorithm>/<noise>/seed<k>.json and "
                   "count a recorded run as complete (commit DIR to resume a study elsewhere)")
    p.add_argument("--accelerator", help="--trainer.accelerator for every run (e.g. gpu)")
    p.add_argument("--precision", help="--trainer.precision for every run (e.g. bf16-mixed)")
    p.add_argument("--devices", help="--trainer.devices for every run")
    p.add_argument("--threads", type=int, help="OMP threads per run (default: the setting's, else torch's)")
    p.add_argument("--jobs", type=int, help="runs at once (default: the setting's; a GPU fits several 135M runs)")
    p.add_argument("--stop-after", type=float, metavar="MINUTES", help="start no run after this many minutes; the "
                   "runs in flight finish (fit a study into a session; touching OUT/STOP does the same at any time)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and whether each run is complete")
    p.add_argument("--report-only", action="store_true", help="only rebuild results.md and robustness.png")
    args = p.parse_args(argv)
    args.setting = "tiny" if args.tiny else "small" if args.small else "medium" if args.medium else "full"
    args.algorithms_given = args.algorithms is not None
    setting = SETTINGS[args.setting]
    args.algorithms = args.algorithms or setting.algorithms
    args.noises = args.noises or setting.noises + (["rm"] if args.rm_path and "rm" not in setting.noises else [])
    args.seeds = args.seeds if args.seeds is not None else setting.seeds
    args.max_steps = args.max_steps or setting.max_steps
    args.threads = args.threads if args.threads is not None else setting.threads
    args.jobs = args.jobs if args.jobs is not None else setting.jobs
    if "rm" in args.noises and not args.rm_path:
        p.error("--noises rm needs --rm-path")
    if args.variants and setting.ablation_noise not in args.noises:
        where = (f"--noises without {setting.ablation_noise}" if setting.ablation_noise else
                 f"--{args.setting}, which has no ablation noise")
        p.error(f"--variants runs at the ablation noise, but {where}: use --medium or the full grid with its "
                "ablation noise, or name the variants in --algorithms with the --noises you want")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    setting, out = SETTINGS[args.setting], args.out.resolve()
    args.ledger = args.ledger.resolve() if args.ledger is not None else None
    runs = plan_runs(setting, args, out, extra)
    print(f"{len(runs)} runs ({args.setting}: {setting.config}, {args.max_steps} rollout batches each) -> {out}")
    if args.dry_run:
        for run in runs:
            state = "complete" if is_complete(run, args.max_steps) else "to run"
            print(f"# {run.algorithm} / {run.noise} / seed {run.seed}: {state}\n{shlex.join(run.command)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.report_only:
        start = time.perf_counter()
        deadline = None if args.stop_after is None else time.monotonic() + 60 * args.stop_after
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            jobs = [pool.submit(execute, run, args.max_steps, args.threads, out, deadline) for run in runs]
            ran = 0  # runs that trained (recorded ones are skipped at once and say nothing of the time left)
            for done, job in enumerate(as_completed(jobs), 1):  # reported as they end (runs differ in length)
                run, status = job.result()
                ran += status.startswith(("done", "failed"))
                elapsed = time.perf_counter() - start
                left = f"about {elapsed / ran * (len(runs) - done) / 60:.1f} min left" if ran else "time left unknown"
                print(f"[{done}/{len(runs)}] {run.algorithm} / {run.noise} / seed {run.seed}: {status} "
                      f"(elapsed {elapsed / 60:.1f} min, {left})", flush=True)
                if status.startswith("failed"):
                    failed.append(run)
    results = collect(runs, args.max_steps)
    header = (f"# Robustness benchmark ({args.setting})\n\nBase config `{setting.config}`, "
              f"{args.max_steps} rollout batches per run, seeds {args.seeds}. Runs: `{out / 'runs'}`.\n\n"
              f"Command: `python benchmarks/robustness.py {shlex.join(argv if argv is not None else sys.argv[1:])}`")
    text = results_markdown(results, args.noises, header)
    missing = [f"{r.algorithm}/{r.noise}/seed{r.seed}" for r in runs if not is_complete(r, args.max_steps)]
    if missing:
        text += "\nMissing (failed or not run): " + ", ".join(missing) + "\n"
    (out / "results.md").write_text(text)
    plot(results, args.noises, out / "robustness.png")
    print(text)
    print(f"wrote {out / 'results.md'} and {out / 'robustness.png'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
