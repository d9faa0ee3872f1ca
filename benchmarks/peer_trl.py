"""Peer A/B: seconds per GRPO step of our system against TRL's ``GRPOTrainer``, on the same workload, on the CPU.

Workload (both sides): SmolLM2-135M-Instruct (the local directory of :func:`vrpo_pl.hub.smollm2_path`), float32
weights, LoRA r=16, alpha=32 on q/k/v/o (no dropout); per step 8 prompts x 4 samples = 32 responses of at most 32
new tokens at temperature 1.0 (top-k off, top-p 1.0); one epoch and one optimizer step (AdamW, lr 1e-4, gradient
norm clip 1.0, constant rate) over all 32; group-normalized advantages; k3 KL to the adapter-disabled reference in
the loss, beta 0.04; token-mean loss; reward 1.0 when the last number of the completion equals the answer. Prompts:
reasoning-gym ``chain_sum`` (2 terms of 1 digit, as configs/quickstart.yaml), through the chat template.

What is measured: every configuration runs in a fresh process, 1 warm-up + N steps, nothing else in parallel, in
the order ours, TRL fp32, TRL bf16 (then again, per round). s / step = the time between the ends of consecutive
steps (so each step's logging and data loading count, as in benchmarks/throughput.py, whose "iteration" is the
time between consecutive ``on_train_batch_end`` calls); medians over the measured steps of every round. For TRL the
callback also records ``on_step_begin`` -> ``on_step_end`` (column "in step"). Generation: ours from the system's
phase timer; TRL does not expose its ``generate`` time with ``report_to="none"`` (its profiling context logs to
wandb/mlflow/trackio only), so it is read from the outside with torch forward hooks on the causal LM: first to last
forward call that receives ``past_key_values`` (the decode loop), per step. Peak memory: the process's peak RSS
(``ru_maxrss``), the largest over rounds.

- ours: ``.venv/bin/python benchmarks/throughput.py --algorithms grpo --epochs 1 --mini-batch 32 --iters N
  --dtype auto --only grpo --child-out rec.json`` (its child mode: one algorithm, one process, a JSON record; it
  then replays the steps for its lower bound, about as long again, not timed here): our defaults, which pick bf16
  base weights on a CPU with bf16 units. ``ours-fp32`` forces float32 weights (``--dtype float32``, what a CPU
  without bf16 units gets); ``ours-bf16`` is float32 weights under bf16 autocast (``--precision bf16-mixed``), the
  analogue of TRL's ``bf16=True``.
- TRL: ``.venv-trl/bin/python benchmarks/peer_trl.py trl-child ...`` in its own virtual environment (TRL is a peer,
  never a dependency: nothing in vrpo_pl imports it).

    python benchmarks/peer_trl.py setup                                   # once: .venv-trl (about 80 s, 1.6 GB)
    python benchmarks/peer_trl.py compare --iters 3 --rounds 2 --out runs/bench/peer_trl.md
    python benchmarks/peer_trl.py compare --iters 1 --rounds 1 --prompts 2 --samples 2 --new-tokens 4   # smoke
    python benchmarks/peer_trl.py compare --configs ours ours-bf16 trl-fp32 trl-bf16     # + ours under autocast
    .venv-trl/bin/python benchmarks/peer_trl.py trl-child --steps 3 --bf16 0 --out /tmp/trl.json

TRL 1.16 ``GRPOConfig`` knobs set to the workload: per_device_train_batch_size=32, gradient_accumulation_steps=1,
num_generations=4, generation_batch_size=32, num_iterations=1, max_completion_length=32, temperature=1.0, top_k=0,
top_p=1.0, min_p=None, repetition_penalty=1.0, beta=0.04, epsilon=0.2, loss_type="dapo" (token mean over the whole
batch, = our token_mean with one mini-batch), scale_rewards="group", learning_rate=1e-4, lr_scheduler_type=
"constant", weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch" (TRL's default is the fused AdamW; ours is
plain ``torch.optim.AdamW``), bf16 (TRL defaults it to True: set explicitly), gradient_checkpointing=False (TRL
defaults it to True; ours does not checkpoint), use_bias_correction_kl=False (TRL 1.16 defaults to multiplying the
KL by the ratio; ours is plain k3), disable_dropout=True, mask_truncated_completions=False, use_vllm=False,
use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, seed=0.

Knobs that do not match (none changes the arithmetic of a step, except where said):
- Ours gets its learning rate (3e-4) and KL coefficient (0.02) from configs/quickstart.yaml: benchmarks/throughput.py
  has no flag for them. They change the values, not the work.
- Sampling: ours uses its own decode loop (``--model.generation.backend loop``, the default); TRL calls
  ``generate``. Both sample top-k off / top-p 1.0 and stop at EOS, but draw
  different tokens, so response lengths differ: the table shows response tokens per step.
- Old log-probs: TRL with num_iterations=1 skips the old-policy pass (ratio 1 by ``detach``); ours reads them from
  the sampler's logits in float32 (no extra pass) but does run a policy pass under bf16 (sampler_logprobs is off
  in bf16). TRL computes log-probs with its fused, chunked LM head.
- Prompt length: ours truncates prompts at 128 tokens; TRL 1.16 has no max_prompt_length. chain_sum prompts are
  far shorter, so neither truncates.
- TRL's bf16=True is autocast (float32 weights), and accelerate applies it to the wrapped model's ``forward``,
  which ``generate`` bypasses: TRL bf16 samples in float32 and only its log-prob passes run in bf16 (seen in the
  record's ``autocast`` field: per kind of forward call, whether autocast was on; printed under the table).

Setup (``setup``): a venv at ``.venv-trl`` with ``torch==2.13.0`` first, then ``trl==1.16.0 peft reasoning-gym``
under the project's constraints.txt. No pin had to be relaxed (:data:`RELAXED_PINS`; datasets resolved to 5.2.0).
Measured on the AMD EPYC machine (2026-12): 77 s, 1.6 GB on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = REPO_ROOT / ".venv-trl"
TRL_PYTHON = TRL_VENV / "bin" / "python"
OURS_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
TORCH_PIN = "torch==2.13.0"  # installed first and alone: an unpinned torch resolves to GBs of CUDA wheels
TRL_PACKAGES = ["trl==1.16.0", "peft", "reasoning-gym"]
RELAXED_PINS: dict[str, str] = {}  # constraints.txt name -> why TRL cannot have that pin (none needed so far)
SETUP_MARKER = TRL_VENV / "peer_trl_setup.json"

LORA = {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
LEARNING_RATE, BETA, SEED = 1e-4, 0.04, 0
TASK, TASK_PARAMS = "chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
CONFIGS = ["ours", "ours-fp32", "ours-bf16", "trl-fp32", "trl-bf16"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# vrpo_pl.rewards.verifiers._NUMBER, copied (the TRL venv has no vrpo_pl) so both sides give the same verdicts.
_NUMBER = re.compile(r"(?:(?<![\w)])[-+])?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?:(?<![\w)])-)?\.\d+")


# ------------------------------------------------------------------------------------------------- setup
def _dir_bytes(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (links not followed)."""
    return sum(os.lstat(os.path.join(root, name)).st_blocks * 512 for root, _, files in os.walk(path)
               for name in files)


def trl_constraints() -> Path:
    """The project's constraints.txt less :data:`RELAXED_PINS`, written into the venv."""
    keep = [line for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()
            if line.split("==")[0].strip().lower().replace("_", "-") not in RELAXED_PINS]
    out = TRL_VENV / "constraints-trl.txt"
    out.write_text("\n".join(keep) + "\n")
    return out


def setup(force: bool = False) -> dict:
    """Creates ``.venv-trl`` with TRL. Idempotent: a marker of what was installed makes a second call return at once
    (``force``: run pip again). Returns the marker: seconds taken and bytes on disk."""
    spec = {"torch": TORCH_PIN, "packages": TRL_PACKAGES, "relaxed": sorted(RELAXED_PINS)}
    if SETUP_MARKER.exists() and not force and json.loads(SETUP_MARKER.read_text()).get("spec") == spec:
        done = json.loads(SETUP_MARKER.read_text())
        print(f"setup: {TRL_VENV} is ready (took {done['seconds']:.0f} s, {done['bytes'] / 2**20:,.0f} MiB)")
        return done
    start = time.perf_counter()
    if not TRL_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(TRL_PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, "-c", str(trl_constraints()), *TRL_PACKAGES], check=True)
    subprocess.run([str(TRL_PYTHON), "-m", "pip", "check"], check=True)
    done = {"spec": spec, "seconds": time.perf_counter() - start, "bytes": _dir_bytes(TRL_VENV),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    SETUP_MARKER.write_text(json.dumps(done, indent=1))
    print(f"setup: {TRL_VENV} ready in {done['seconds']:.0f} s, {done['bytes'] / 2**20:,.0f} MiB")
    return done


# ------------------------------------------------------------------------------------- TRL child (in .venv-trl)
def last_number_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """TRL reward function: 1.0 when the last number of the completion equals the answer (NumericVerifier's rule).

    >>> last_number_reward([[{"role": "assistant", "content": "3 + 4 is 7."}], "it is 8"], ["7", "7"])
    [1.0, 0.0]
    """
    rewards = []
    for completion, gold in zip(completions, answer, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        found = _NUMBER.findall(text)
        guess = found[-1].replace(",", "").lstrip("+") if found else None
        try:
            same = guess is not None and float(guess) == float(gold)
        except ValueError:
            same = guess == str(gold).strip()
        rewards.append(1.0 if same else 0.0)
    return rewards


def chain_sum_rows(size: int, seed: int) -> list[dict]:
    """``size`` reasoning-gym chain_sum questions in TRL's conversational format, with their answers."""
    import reasoning_gym

    data = reasoning_gym.create_dataset(TASK, size=size, seed=seed, **TASK_PARAMS)
    return [{"prompt": [{"role": "user", "content": data[i]["question"]}], "answer": str(data[i]["answer"])}
            for i in range(size)]


class GenerationClock:
    """Times ``generate`` from outside TRL: torch forward hooks on the causal LM note the first and last forward
    call of a step that receives ``past_key_values`` (prefill and decode steps; training and reference passes get
    none), and whether autocast was on for each kind of call."""

    def __init__(self, lm) -> None:
        self.first: float | None = None
        self.last: float | None = None
        self.calls, self.calls_per_step = 0, []
        self.autocast: dict[str, set[bool]] = {"generate": set(), "other": set()}
        lm.register_forward_pre_hook(self._before, with_kwargs=True)
        lm.register_forward_hook(self._after, with_kwargs=True)

    def _before(self, module, args, kwargs) -> None:
        import torch

        decoding = kwargs.get("past_key_values") is not None
        self.autocast["generate" if decoding else "other"].add(torch.is_autocast_enabled("cpu"))
        if decoding and self.first is None:
            self.first = time.perf_counter()

    def _after(self, module, args, kwargs, output) -> None:
        if kwargs.get("past_key_values") is not None:
            self.last = time.perf_counter()
            self.calls += 1

    def take(self) -> float:
        """Seconds from the first to the last decoding call since the previous ``take``."""
        seconds = 0.0 if self.first is None or self.last is None else self.last - self.first
        self.first = self.last = None
        self.calls_per_step.append(self.calls)
        self.calls = 0
        return seconds


def step_clock():
    """A ``TrainerCallback`` that times each optimizer step (``on_step_begin`` -> ``on_step_end`` and end to end),
    its generation (:class:`GenerationClock`) and keeps TRL's logs per step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.begin, self.generate = 0.0, None
            self.in_step, self.ends, self.generation, self.logs = [], [], [], {}

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.generate = GenerationClock(model.get_base_model() if hasattr(model, "get_base_model") else model)

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.in_step.append(now - self.begin)
            self.ends.append(now)
            self.generation.append(self.generate.take())

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.setdefault(state.global_step, {}).update(logs or {})  # the run's summary shares the last step

    return StepClock()


def grpo_config(args: argparse.Namespace, output_dir: str):
    """TRL's ``GRPOConfig`` for the workload (every knob the module docstring lists)."""
    from trl import GRPOConfig

    batch = args.prompts * args.samples
    return GRPOConfig(
        output_dir=output_dir, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, seed=SEED, max_steps=1 + args.steps, bf16=bool(args.bf16), fp16=False,
        gradient_checkpointing=False, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=args.samples, generation_batch_size=batch, num_iterations=1,
        max_completion_length=args.new_tokens, temperature=1.0, top_k=0, top_p=1.0, min_p=None,
        repetition_penalty=1.0, beta=BETA, use_bias_correction_kl=False, epsilon=0.2, loss_type="dapo",
        scale_rewards="group", mask_truncated_completions=False, disable_dropout=True, use_vllm=False,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", dataloader_num_workers=0, remove_unused_columns=False,
    )


def trl_child(args: argparse.Namespace) -> dict:
    """Trains TRL's GRPO for 1 warm-up + ``args.steps`` steps; returns the timing record (see ``compare``)."""
    for name, value in OFFLINE.items():
        os.environ.setdefault(name, value)
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = chain_sum_rows(args.prompts * (1 + args.steps), SEED)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    clock = step_clock()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trl.GRPOTrainer(model=model, reward_funcs=last_number_reward, args=grpo_config(args, tmp),
                                  train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                  peft_config=lora, callbacks=[clock])
        trainer.train()
    batch = args.prompts * args.samples
    measured = range(2, 2 + args.steps)  # global steps after the warm-up
    return {
        "config": "trl-bf16" if args.bf16 else "trl-fp32", "samples": batch,
        "interval": [b - a for a, b in pairwise(clock.ends)], "in_step": clock.in_step[1:],
        "generation": clock.generation[1:],
        "tokens": [clock.logs[s]["completions/mean_length"] * batch for s in measured
                   if "completions/mean_length" in clock.logs.get(s, {})],
        "reward": [clock.logs[s].get("reward") for s in measured if s in clock.logs],
        "warmup_seconds": clock.in_step[0], "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "torch_threads": torch.get_num_threads(),
        "decoding_calls": clock.generate.calls_per_step,
        "autocast": {kind: sorted(states) for kind, states in clock.generate.autocast.items()},
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
    }


# --------------------------------------------------------------------------------------------------- compare
def config_command(config: str, args: argparse.Namespace, out: Path) -> list[str]:
    """The command line that measures one configuration and writes its JSON record to ``out``."""
    size = ["--prompts", str(args.prompts), "--samples", str(args.samples), "--new-tokens", str(args.new_tokens)]
    threads = ["--threads", str(args.threads)] if args.threads else []
    if config.startswith("ours"):
        # ours: the defaults (--model.dtype auto: bf16 base weights where the CPU has bf16 units); ours-fp32: float32
        # weights; ours-bf16: float32 weights under bf16 autocast (the analogue of TRL's bf16=True).
        precision = "bf16-mixed" if config == "ours-bf16" else "32-true"
        dtype = "auto" if config == "ours" else "float32"
        return [str(args.ours_python), str(REPO_ROOT / "benchmarks" / "throughput.py"), "--algorithms", "grpo",
                "--epochs", "1", "--mini-batch", str(args.prompts * args.samples), "--iters", str(args.iters), *size,
                "--dtype", dtype, "--precision", precision, *threads, "--only", "grpo:loop", "--child-out", str(out)]
    return [str(TRL_PYTHON), str(Path(__file__).resolve()), "trl-child", "--steps", str(args.iters),
            "--bf16", "1" if config == "trl-bf16" else "0", *size, "--model-path", str(args.model_path), *threads,
            "--out", str(out)]


def ours_record(rec: dict) -> dict:
    """benchmarks/throughput.py's child record in this script's shape."""
    rows = rec["framework"]
    return {"samples": rec["samples"], "interval": [r["iteration"] for r in rows],
            "generation": [r["generation"] for r in rows], "tokens": [rec["tokens"]], "peak_bytes": rec["peak_bytes"],
            "dtype": rec.get("dtype")}


def run_config(config: str, args: argparse.Namespace) -> dict:
    """Measures ``config`` in a fresh process; returns its record with the command that made it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{config}.json"
        cmd = config_command(config, args, out)
        env = {**os.environ, **OFFLINE}
        subprocess.run(cmd, check=True, cwd=REPO_ROOT, env=env)
        rec = json.loads(out.read_text())
    rec = ours_record(rec) if config.startswith("ours") else rec
    return {**rec, "config": config, "command": shlex.join(cmd)}


def _probe(python: Path, code: str) -> str:
    return subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def summarize(runs: list[dict]) -> dict:
    """One configuration's rounds pooled: medians over all measured steps, the largest peak RSS."""
    pooled = {key: [x for r in runs for x in r.get(key, [])] for key in ("interval", "in_step", "generation", "tokens")}
    med = {key: statistics.median(v) if v else None for key, v in pooled.items()}
    return {**med, "samples": runs[0]["samples"], "samples_per_s": runs[0]["samples"] / med["interval"],
            "peak_bytes": max(r["peak_bytes"] for r in runs),
            "rounds": [statistics.median(r["interval"]) for r in runs]}


def _cell(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def report(results: dict[str, list[dict]], args: argparse.Namespace, context: dict) -> str:
    """The Markdown report: the summary table, medians per round, and the exact commands."""
    names = {"ours": "ours (default: dtype auto)", "ours-fp32": "ours (fp32)", "ours-bf16": "ours (bf16-mixed)",
             "trl-fp32": "TRL fp32 (its CPU default)", "trl-bf16": "TRL bf16=True"}
    summary = {config: summarize(runs) for config, runs in results.items()}
    ours = {c: summary[c]["samples_per_s"] for c in ("ours", "ours-fp32", "ours-bf16") if c in summary}
    batch = args.prompts * args.samples
    lines = [f"# Peer A/B: our GRPO vs TRL {context['trl']} GRPOTrainer", "",
             f"SmolLM2-135M-Instruct + LoRA r={LORA['r']} (q/k/v/o), {args.prompts} prompts x {args.samples} samples "
             f"= {batch} responses of at most {args.new_tokens} new tokens per step, one optimizer step per step; "
             f"{args.iters} measured steps after 1 warm-up, {args.rounds} round(s) in the order "
             f"{', '.join(names[c] for c in args.configs)}, each run a fresh process.", "",
             f"CPU: {context['cpu']}; torch threads: ours {context['ours_threads']}, TRL {context['trl_threads']}; "
             f"{context['date']}; torch {context['torch']}, transformers {context['transformers']}.", "",
             "| " + " | ".join(["configuration", "s / step", "in step", "generation s", "samples/s",
                                "response tokens / step", "peak RSS", *(f"{names[c]} ÷ this" for c in ours)]) + " |",
             "|---|" + "---:|" * (6 + len(ours))]
    for config, s in summary.items():
        ratios = [f"{value / s['samples_per_s']:.2f}" for value in ours.values()]
        lines.append(f"| {names[config]} | {s['interval']:.3f} | {_cell(s['in_step'], '.3f')} | "
                     f"{_cell(s['generation'], '.3f')} | {s['samples_per_s']:.2f} | {_cell(s['tokens'], '.0f')} | "
                     f"{s['peak_bytes'] / 2**20:,.0f} MiB |" + "".join(f" {x} |" for x in ratios))
    lines += ["", "s / step per round (median over its measured steps):", "",
              "| configuration | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " |",
              "|---|" + "---:|" * args.rounds]
    lines += [f"| {names[c]} | " + " | ".join(f"{x:.3f}" for x in s["rounds"]) + " |" for c, s in summary.items()]
    autocast = {r["config"]: r["autocast"] for runs in results.values() for r in runs if "autocast" in r}
    lines += ["", "s / step: end of one step to the end of the next (medians over the measured steps of every round); "
              "in step: TRL's on_step_begin -> on_step_end; generation: ours from the system's phase timer, TRL from "
              "forward hooks (first to last decoding call); samples/s = responses per step / s per step; response "
              "tokens: median per step (sampling is random on both sides); peak RSS: largest over rounds; ratios: "
              "our samples/s over that row's. TRL autocast on during (generate, other forward calls): "
              + "; ".join(f"{c}: {a['generate']}, {a['other']}" for c, a in autocast.items()) + ". Knobs the two "
              "sides do not share: benchmarks/peer_trl.py's docstring.", "",
              "Commands (first round):", "", "```"]
    lines += [runs[0]["command"] for runs in results.values()] + ["```", ""]
    return "\n".join(lines)


def compare(args: argparse.Namespace) -> str:
    """Alternates the configurations ``args.rounds`` times, one fresh process each; writes and returns the report."""
    if any(c.startswith("trl") for c in args.configs) and not TRL_PYTHON.exists():
        raise SystemExit(f"{TRL_PYTHON} is missing: run `python {Path(__file__).name} setup` first")
    if args.model_path is None:
        args.model_path = _probe(args.ours_python, "from vrpo_pl.hub import smollm2_path; print(smollm2_path())")
    results: dict[str, list[dict]] = {config: [] for config in args.configs}
    for round_index in range(args.rounds):
        for config in args.configs:
            rec = run_config(config, args)
            results[config].append(rec)
            print(f"round {round_index + 1} {config}: {statistics.median(rec['interval']):.3f} s / step", flush=True)
    versions = _probe(args.ours_python, "import torch, transformers; print(torch.__version__, transformers.__version__,"
                      " torch.get_num_threads())").split()
    trl_runs = [r for c in args.configs if c.startswith("trl") for r in results[c]]
    context = {"cpu": cpu_model(), "date": time.strftime("%Y-%m-%d %H:%M %Z"), "torch": versions[0],
               "transformers": versions[1], "ours_threads": args.threads or versions[2],
               "trl_threads": trl_runs[0]["torch_threads"] if trl_runs else "-",
               "trl": trl_runs[0]["versions"]["trl"] if trl_runs else "1.16.0"}
    text = report(results, args, context)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"context": context, "results": results}, indent=1))
    return text


# ------------------------------------------------------------------------------------------------------ main
def _default_model_path() -> Path:
    """Where :func:`vrpo_pl.hub.smollm2_path` keeps SmolLM2 (``$VRPO_CACHE`` or ``~/.cache/vrpo_pl``), without
    importing vrpo_pl (the TRL venv does not have it)."""
    return Path(os.environ.get("VRPO_CACHE", Path.home() / ".cache" / "vrpo_pl")).expanduser() / "SmolLM2-135M-Instruct"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("setup", help="create .venv-trl with torch, TRL, peft and reasoning-gym (idempotent)")
    s.add_argument("--force", action="store_true", help="run pip again even if the venv is marked as set up")
    size = argparse.ArgumentParser(add_help=False)
    size.add_argument("--prompts", type=int, default=8, help="prompts per step")
    size.add_argument("--samples", type=int, default=4, help="samples per prompt (TRL's num_generations)")
    size.add_argument("--new-tokens", type=int, default=32, help="max new tokens (TRL's max_completion_length)")
    size.add_argument("--threads", type=int, help="torch intra-op threads on both sides (default: torch's)")
    c = sub.add_parser("compare", parents=[size], help="alternate ours and TRL, one fresh process per run")
    c.add_argument("--iters", type=int, default=3, help="measured steps per run, after one warm-up")
    c.add_argument("--rounds", type=int, default=2, help="how many times the configurations alternate")
    c.add_argument("--configs", nargs="+", choices=CONFIGS, default=["ours", "ours-fp32", "trl-fp32", "trl-bf16"],
                   help="configurations, in the order they run within a round")
    c.add_argument("--model-path", help="local SmolLM2 directory (default: vrpo_pl.hub.smollm2_path())")
    c.add_argument("--ours-python", type=Path, default=OURS_PYTHON, help="the project's Python (its venv)")
    c.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "bench" / "peer_trl.md",
                   help="Markdown report (the raw records go beside it as .json)")
    t = sub.add_parser("trl-child", parents=[size], help="(inside .venv-trl) train TRL's GRPO and write timings")
    t.add_argument("--steps", type=int, default=3, help="measured steps, after one warm-up")
    t.add_argument("--bf16", type=int, choices=[0, 1], default=0, help="TRL's bf16=True (autocast) when 1")
    t.add_argument("--model-path", default=str(_default_model_path()), help="local SmolLM2 directory")
    t.add_argument("--out", type=Path, required=True, help="where to write the JSON record")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "setup":
        setup(force=args.force)
    elif args.mode == "trl-child":
        args.out.write_text(json.dumps(trl_child(args), indent=1))
    else:
        compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
