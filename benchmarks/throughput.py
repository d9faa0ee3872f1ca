"""Throughput benchmark: seconds per rollout batch of PPO, GRPO and VRPO, split into phases, against a lower bound.

Workload (``--size base``): SmolLM2-135M-Instruct with LoRA r=16 on q/k/v/o (policy, and critic for PPO/VRPO),
B = 32 responses per rollout batch (8 prompts x 4 samples for every algorithm, because GRPO needs a group),
32 new tokens, 2 PPO epochs over mini-batches of 8, reward = NumericVerifier. ``--size large`` is 128 responses
(32 x 4) of 128 tokens in mini-batches of 16 (for a GPU); ``--model-path`` swaps in another local model; ``--tiny``
uses TinyLM.

For each algorithm, in one process, the real system is built by ``VRPOCLI(..., run=False)`` and trained by
``trainer.fit`` for 1 warm-up + ``--iters`` rollout batches. Phases come from the system's own timer
(``RLSystem.phase_seconds``, also logged as ``perf/*``), read by a callback after each rollout batch: generation;
frozen passes = rollout minus generation (old log-probs, reference, guide targets, critic values); scoring; policy
update; critic update; fused update (both models' steps from fused passes, ``--model.ppo.fuse_update``); other =
the rest of the iteration (advantages, metrics, Lightning's loop, data). An
iteration is the time between consecutive ``on_train_batch_end`` calls.

The lower bound replays each measured rollout batch without the framework: the system's sampler called bare on the
same prompts for exactly the same number of new tokens (no EOS), then the same forward
passes (policy unless its log-probs come from the sampler, reference, critic, in the same chunks), the same decode +
reward call, and the same forward/backward passes and optimizer steps of the update (same mini/micro-batch shapes,
a plain clipped loss, no statistics), back to back: no-gradient passes as wide as ``max_tokens_per_forward``
allows, update micro-batches of consecutive rows (whole prompt groups, as ``--model.ppo.shuffle prompts`` deals them)
trimmed to their own extent, under the update's attention, log-probs by the system's chunked function. Reported:
medians over the measured iterations, ratio = full iteration / lower bound (goal <= 1.15). With
``--share-prompt-prefix`` (on by default, as in the system) the lower bound's frozen and update passes share each
slice's prompts as the system's do, and so does its sampler's prefill. ``--no-share-prompt-prefix`` measures the
plain passes (``benchmarks/prefix_passes.py``: pass by pass). ``--pack-rows`` (on by default, as in the system:
``--model.ppo.pack_rows``) makes those passes packed calls over the real tokens, the lower bound's too;
``--fuse-update`` (on by default: ``--model.ppo.fuse_update``) runs each micro-batch's policy and critic passes as one
call where the system does, timed as the "fused update" phase (both models' optimizer steps), the lower bound's too;
``--lean-decode`` (on by default: ``--model.generation.lean_decode``) runs the ``loop`` sampler's decode steps through
:mod:`vrpo_pl.decode` (the lower bound calls the same sampler).

The compute bound is what the machine's matrix units need for the step's arithmetic: FLOPs counted from the
token counts of each pass (:func:`step_flops`: 2 x the body's parameters per token of every forward pass, 2 x more
per token of every trained pass for the activation gradients, 2 x more again without LoRA for the weight
gradients, the LM head only where logits are computed; attention scores and the tiny LoRA matrices are left out),
divided by the matrix-multiply peak measured in the same run (:func:`matmul_peak`, fp32 and bf16; the one that
matches ``--precision``). ``x bound`` = seconds per rollout batch / that time: the figure to drive down. A second
table splits it by phase (:func:`phase_flops`: generation, the no-gradient passes with scoring, the update), each
phase's seconds over its own arithmetic, to show where the gap is; a decode step reads every weight for a few rows,
so generation's is memory-bound, far above its arithmetic (``benchmarks/decode_steps.py`` measures its matrix
floor). These FLOPs are those of the plain passes (every row computes its prompt): sharing prompts removes some of
them, which shows as a lower ``x bound`` (below 1 where the machine runs its matrices near the measured peak). A
third table divides by the arithmetic the passes do instead (``phase_flops(..., prompts_once=True)``: each
distinct prompt once), how far the step is from its matrix units.

    python benchmarks/throughput.py                                   # CPU, SmolLM2, base size
    python benchmarks/throughput.py --accelerator gpu --precision bf16-mixed --size large --out runs/bench/tp.md
    python benchmarks/throughput.py --tiny --iters 2 --no-isolate     # seconds
    python benchmarks/throughput.py --algorithms vrpo --iters 1 --profile   # + torch.profiler's top operators
    .venv-vllm/bin/python benchmarks/throughput.py --algorithms vrpo --backends loop vllm   # A/B of the samplers

``--backends`` measures each algorithm once per sampler (``--model.generation.backend``), side by side; the vLLM
rows need the vLLM environment. Their lower bound generates with the same engine, called bare (``llm.generate``
with ``min_tokens`` = ``max_tokens`` = the rollout's length); the engine's start-up and warm-up fall in the warm-up
rollout batch, and each weight sync (also reported apart) in "other".

Peak memory: on a GPU ``torch.cuda.max_memory_allocated`` over the training run; on the CPU the process's peak
RSS, so by default each algorithm (and the policy-alone reference) runs in its own fresh process
(``--no-isolate``: one process, peak RSS sampled every 5 ms while it trains, which includes earlier runs' freed
but retained memory). "policy alone" = the LoRA policy's weights, one ``generate`` of the rollout's shape and one
mini-batch forward/backward.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ["ppo", "grpo", "vrpo"]
SIZES = {  # prompts, samples per prompt, new tokens, mini-batch
    "base": (8, 4, 32, 8),
    "large": (32, 4, 128, 16),
    "tiny": (4, 2, 8, 4),
}
LORA = {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
PHASES = ["generation", "frozen", "score", "update_policy", "update_critic", "update_fused"]


def cli_args(algorithm: str, args: argparse.Namespace, backend: str = "loop") -> list[str]:
    """LightningCLI arguments of one algorithm's measured run (no validation, logger or checkpoints)."""
    from vrpo_pl.rollout import GenerationSettings

    config = REPO_ROOT / "configs" / ("tiny.yaml" if args.tiny else "quickstart.yaml")
    adapters = {**LORA, **({"compute": args.lora_compute} if args.lora_compute else {})}
    lora = json.dumps(adapters)
    critic_lora = json.dumps({**adapters, "top_layers": args.critic_top_layers})
    out = ["--config", str(config), "--model.algorithm", algorithm, "--model.critic.vib", "null",
           "--model.critic.aux", "null", "--model.reward", '{"class_path": "vrpo_pl.rewards.NumericVerifier"}',
           "--model.lora", lora, "--model.critic_lora", "null" if algorithm == "grpo" else critic_lora,
           "--model.generation.max_new_tokens", str(args.new_tokens), "--model.generation.temperature", "1.0",
           "--model.ppo.epochs", str(args.epochs), "--model.ppo.mini_batch_size", str(args.mini_batch),
           "--model.ppo.micro_batch_size", "null", "--model.validate_at_start", "false",
           *(["--model.ppo.critic_epochs", str(args.critic_epochs)] if args.critic_epochs is not None else []),
           *(["--model.compile", "true"] if args.compile else []),
           *(["--model.ppo.shuffle", args.shuffle] if args.shuffle else []),
           # Always named: configs/quickstart.yaml pins multinomial so that its documented run reproduces.
           "--model.generation.draw", args.draw or GenerationSettings().draw,
           *(["--model.ppo.max_tokens_per_forward", str(args.forward_tokens or "null")]
             if args.forward_tokens is not None else []),
           "--data.prompts_per_rollout", str(args.prompts), "--data.samples_per_prompt", str(args.samples),
           "--trainer.max_steps", str(1 + args.iters), "--trainer.limit_val_batches", "0",
           "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
           "--trainer.default_root_dir", tempfile.gettempdir(),
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
           "--trainer.callbacks", '[{"class_path": "vrpo_pl.callbacks.FrozenLMTargets"}]',
           "--trainer.accelerator", args.accelerator, "--trainer.precision", args.precision, "--trainer.devices", "1",
           "--model.dtype", args.dtype, "--model.generation.backend", backend,
           "--model.ppo.share_prompt_prefix", str(args.share_prompt_prefix).lower(),
           "--model.generation.share_prompt_prefill", str(args.share_prompt_prefix).lower(),
           "--model.ppo.pack_rows", str(args.pack_rows).lower(),
           "--model.ppo.fuse_update", str(args.fuse_update).lower(),
           "--model.generation.lean_decode", str(args.lean_decode).lower()]
    if args.tiny:
        out += ["--data.source.init_args.path", str(REPO_ROOT / "configs" / "data" / "arithmetic.jsonl")]
    if args.tiny and "vllm" in args.backends:  # vLLM's CPU attention needs head_dim 64, not TinyLM's default 16
        out += ["--model.policy.init_args.hidden_size", "128", "--model.policy.init_args.num_heads", "2"]
    if args.model_path:
        out += ["--model.policy", "vrpo_pl.models.PretrainedLM", "--model.policy.init_args.path", args.model_path]
    return out


def build_cli(algorithm: str, args: argparse.Namespace, backend: str = "loop"):
    from vrpo_pl.cli import build_cli as build

    return build(cli_args(algorithm, args, backend), save_config_callback=None)


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PeakRSS:
    """Samples this process's resident set size every 5 ms in a thread; ``peak`` in bytes.

    Only for ``--no-isolate`` (a fresh process per row reads its exact peak from ``ru_maxrss`` instead): the thread
    competes for the GIL with the decode loop and measured 10-20% slower sampling.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def __enter__(self):
        import os

        self.peak, self._stop, self._page = 0, threading.Event(), os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)
        if self.enabled:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * self._page)

    def __exit__(self, *exc):
        self._stop.set()
        if self.enabled:
            self._thread.join()


class PhaseTimer:
    """Reads the system's phase times and keeps what the lower bound replays, after each rollout batch."""

    def __init__(self) -> None:
        import lightning.pytorch as pl

        timer = self

        class _Callback(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if timer.last_end is None:
                    timer.first_start = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                _sync()
                now = time.perf_counter()
                if timer.last_end is not None:
                    timer.iterations.append({**pl_module.phase_seconds, "iteration": now - timer.last_end})
                else:
                    timer.warmup = now - timer.first_start
                timer.captures.append({"rollout": pl_module.last_rollout, "batch": batch})
                timer.last_end = now

        self.callback = _Callback()
        self.captures: list[dict] = []
        self.iterations: list[dict[str, float]] = []
        self.last_end: float | None = None
        self.first_start = self.warmup = float("nan")  # the warm-up rollout batch (compilation included)


def matmul_peak(dtype_name: str, threads: int | None = None, device: str = "cpu",
                shape: tuple[int, int, int] = (2560, 576, 1536), reps: int = 10) -> float:
    """Measured matrix-multiply throughput in FLOP/s of ``(rows x k) @ (k x n)``, ``shape = (rows, k, n)``: by
    default 2560x576 @ 576x1536 (a SmolLM2-sized layer over a micro-batch); best of 5 timings of ``reps`` products
    after a warm-up."""
    import torch

    rows, k, n = shape
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(rows, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(5):
        _sync()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync()
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * rows * k * n / best


def phase_flops(system, r, prompts_once: bool = False) -> dict[str, float]:
    """Matrix FLOPs one rollout batch needs, by phase (``generation``, ``frozen``: the no-gradient passes,
    ``update``): every pass's real (non-padding) tokens x 2 x the parameters it uses.

    Body = the decoder's linear layers (the embedding lookup is no matmul); the LM head (vocabulary x hidden) counts
    only where logits are computed. Trained passes add 2 x (body + head) per token for activation gradients and,
    without LoRA, 2 x more for the weight gradients. Attention scores and LoRA's low-rank matrices are left out
    (a few percent at these lengths). A critic adapted on its top layers only (``top_layers``) backpropagates
    through those alone.

    ``prompts_once``: the arithmetic the system's passes do rather than the plain passes' (every row computing its
    prompt): where it shares prompts (``--model.generation.share_prompt_prefill`` for the prefill,
    ``--model.ppo.share_prompt_prefix`` for the no-gradient passes, and for the update's when its mini-batches hold
    whole prompt groups, ``--model.ppo.shuffle prompts``), each distinct prompt's columns but the last count once
    per pass over the rollout (:mod:`vrpo_pl.prefix`); a pass split into slices that cut a group counts less than
    it does.
    """
    import torch

    from vrpo_pl.lora import num_layers_of
    from vrpo_pl.prefix import distinct_prompts

    config = system.policy.config
    hidden, vocab = config.hidden_size, config.vocab_size
    body = sum(m.weight.numel() for n, m in system.policy.named_modules()
               if isinstance(m, torch.nn.Linear) and "lora_" not in n and not n.endswith("lm_head"))
    head = hidden * vocab
    tokens = float(r.attention_mask.sum())  # prompt + response, per pass over the whole sequences
    prompt = float(r.attention_mask[:, : r.prompt_width].sum())
    response = float(r.mask.sum())
    # The prompt tokens of a pass that computes each distinct prompt once (all but its last column, which every
    # row computes), for the phases that share.
    shared_prompt = prompt
    if prompts_once and r.prompt_width >= 2:
        distinct = distinct_prompts(r.sequences, r.attention_mask, r.prompt_width)
        if distinct is not None:
            split = r.prompt_width - 1
            shared_prompt = float(r.attention_mask[distinct[0], :split].sum() + r.attention_mask[:, split].sum())
    saved = prompt - shared_prompt
    ppo = system.ppo
    shares = prompts_once and ppo.share_prompt_prefix
    prefill_prompt = shared_prompt if prompts_once and system.generation.share_prompt_prefill else prompt
    frozen_tokens = tokens - saved if shares else tokens
    update_tokens = tokens - saved if shares and ppo.shuffle == "prompts" else tokens
    train_factor = 2.0 if system.lora_spec is not None else 4.0  # backward on top of the forward's 2
    # Prefill (logits at the last prompt position only), then the decode steps.
    generation = 2 * body * prefill_prompt + 2 * head * r.size + 2 * (body + head) * response
    passes = 1 + (0 if system.sampler_logprobs else 1)  # reference (+ the policy's own pass)
    frozen = passes * 2 * (body * frozen_tokens + head * response)
    epochs, critic_epochs = ppo.epochs, ppo.critic_epochs or ppo.epochs
    update = epochs * (2 + train_factor) * (body * update_tokens + head * response)  # policy update
    if system.critic is not None:
        spec = system.critic_lora_spec
        # LoRA: the backward pass computes activation gradients (2 per weight and token) down to the lowest adapted
        # layer only; full fine-tuning adds the weight gradients (4 in all).
        top = None if spec is None else spec.top_layers
        fraction = 1.0 if top is None else top / num_layers_of(system.critic.backbone)
        critic_train = 2.0 * fraction if spec is not None else 4.0
        frozen += 2 * body * frozen_tokens  # the values
        update += critic_epochs * (2 + critic_train) * body * update_tokens
    return {"generation": generation, "frozen": frozen, "update": update}


def step_flops(system, r) -> float:
    """Matrix FLOPs of one rollout batch: the sum of :func:`phase_flops`."""
    return sum(phase_flops(system, r).values())


def vllm_generate(llm, prompt_ids, prompt_mask, num: int, g) -> None:
    """The lower bound's generation for the ``vllm`` rows: one ``llm.generate`` of exactly ``num`` new tokens per
    prompt, as the sampler asks for them (token ids in, no detokenization)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=row[keep.bool()].tolist())
               for row, keep in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)]
    params = SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=0, max_tokens=num, min_tokens=num,
                            detokenize=False)
    llm.generate(prompts, params, use_tqdm=False)


def lower_bound(system, trainer, cap: dict) -> dict[str, float]:
    """The measured rollout batch ``cap`` replayed as bare model calls, back to back; seconds per phase."""
    import torch

    from vrpo_pl.fused import adapter_pairs, fusable, fused_passes
    from vrpo_pl.models import training_attention
    from vrpo_pl.passes import response_logprobs, response_token_logits, rows_per_forward
    from vrpo_pl.rewards.base import Completion
    from vrpo_pl.rollout import micro_batch

    policy, critic, r, g = system.policy, system.critic, cap["rollout"], system.generation
    size, num = r.responses.shape
    prompt_ids, prompt_mask = r.sequences[:, : r.prompt_width], r.attention_mask[:, : r.prompt_width]
    pad = system.tokenizer.pad_token_id
    p, times = system.ppo, {}
    width = r.prompt_width if p.share_prompt_prefix else None  # the system's shared prompt passes, when on
    pack = p.pack_rows  # and its packed ones

    def logp(model, sl):
        logits = response_token_logits(model, r.sequences[sl], r.attention_mask[sl], r.position_ids[sl], num,
                                       prompt_width=width, pack=pack)
        return response_logprobs(logits, r.responses[sl], g.temperature)  # the system's chunked float32 log-probs

    def critic_values(sl, sample=False):
        return critic(r.sequences[sl], r.attention_mask[sl], r.position_ids[sl], num, sample=sample,
                      prompt_width=width, pack=pack).values

    @contextmanager
    def timed(name):
        _sync()
        start = time.perf_counter()
        with trainer.precision_plugin.train_step_context():
            yield
        _sync()
        times[name] = times.get(name, 0.0) + time.perf_counter() - start

    reuse = system.sampler_logprobs  # the old log-probs come from the sampler's logits: no policy pass below
    with torch.no_grad():
        with timed("generation"):
            if g.backend == "vllm":  # the same engine, called bare
                vllm_generate(system.sampler.llm, prompt_ids, prompt_mask, num, g)
                out = r.sequences
            else:  # the system's sampler, called bare; an EOS id that never comes: all `num` tokens, as measured
                responses, _ = system.sampler.sample(policy, prompt_ids, prompt_mask, replace(g, max_new_tokens=num),
                                                     -1, pad, with_logprobs=reuse)
                out = torch.cat([prompt_ids, responses], 1)
        assert out.shape[1] - r.prompt_width == num, "the lower bound generated a different length"
        chunk = rows_per_forward(size, r.sequences.shape[1], p.max_tokens_per_forward,  # as the system's passes
                                 default=p.micro_rows)
        micro = p.micro_rows
        # The system's fused passes (--model.ppo.fuse_update): old log-probs and values from one call per slice.
        pairs = adapter_pairs(policy, critic) if p.fuse_update and pack and critic is not None else None
        fuse = pairs is not None and not reuse
        with timed("frozen"):
            for s in range(0, size, chunk):
                sl = slice(s, s + chunk)
                if not reuse and not fuse:
                    logp(policy, sl)
                if system.reference is not None:
                    logp(system.reference, sl)
                else:
                    with policy.disable_adapter():
                        logp(policy, sl)
                if critic is not None and not fuse:
                    critic_values(sl)
            for s in range(0, size, micro) if fuse else ():
                sl = slice(s, s + micro)
                if fusable(policy, pairs, r.attention_mask[sl], num):
                    with training_attention(policy, critic):
                        logits, _ = fused_passes(policy, critic, pairs, r.sequences[sl], r.attention_mask[sl],
                                                 r.position_ids[sl], num, share_prompts=width is not None)
                    response_logprobs(logits, r.responses[sl], g.temperature)
                else:
                    logp(policy, sl)
                    critic_values(sl)
        with timed("score"):
            lengths = r.mask.sum(1).long().tolist()
            texts = system.tokenizer.batch_decode([r.responses[i, :n].tolist() for i, n in enumerate(lengths)],
                                                  skip_special_tokens=True)
            batch = cap["batch"]
            answers, metadata = batch.get("answer") or [None] * size, batch.get("metadata") or [{}] * size
            system.reward.score([Completion(prompt=q, response=t, answer=a, metadata=m, num_tokens=n)
                                 for q, t, a, m, n in zip(batch["prompt"], texts, answers, metadata, lengths,
                                                          strict=True)])
    optimizers = trainer.optimizers
    critic_epochs = p.critic_epochs or p.epochs  # the critic's passes, as the system's update makes them
    share = width is not None
    vib = bool(system.critic_settings.vib)

    def policy_term(b, logits, tokens):
        ratio = torch.exp(response_logprobs(logits, b.take(r.responses), g.temperature) - b.take(r.logp))
        adv = b.take(r.advantages)
        surrogate = torch.min(ratio * adv, ratio.clamp(1 - p.clip_eps, 1 + p.clip_eps) * adv)
        return -(surrogate * b.take(r.mask)).sum() / tokens

    def critic_term(b, values, tokens):
        return ((values - b.take(r.returns)) ** 2 * b.take(r.mask)).sum() / tokens

    def policy_logits(b):
        return response_token_logits(policy, b.sequences, b.attention_mask, b.position_ids, b.width,
                                     prompt_width=b.prompt_width if share else None, pack=pack)

    def values(b):
        return critic(b.sequences, b.attention_mask, b.position_ids, b.width, sample=vib,
                      prompt_width=b.prompt_width if share else None, pack=pack).values

    def step(i, model):
        torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
        optimizers[i].step()
        optimizers[i].zero_grad(set_to_none=True)

    with training_attention(policy, critic):  # the update's attention, as the system's (eager on CPU in bf16)
        for epoch in range(max(p.epochs, critic_epochs if critic is not None else 0)):
            for start in range(0, size, p.mini_batch_size):
                # Consecutive rows (whole prompt groups, as --model.ppo.shuffle prompts deals them), each micro-batch
                # trimmed to its own extent as the system's are.
                micro_batches = [micro_batch(r, torch.arange(s, s + micro, device=r.mask.device))
                                 for s in range(start, start + p.mini_batch_size, micro)]
                tokens = r.mask[start : start + p.mini_batch_size].sum()
                train_policy, train_critic = epoch < p.epochs, critic is not None and epoch < critic_epochs
                if train_policy and train_critic and pairs is not None:
                    with timed("update_fused"):
                        for b in micro_batches:
                            if fusable(policy, pairs, b.attention_mask, b.width):
                                logits, out = fused_passes(policy, critic, pairs, b.sequences, b.attention_mask,
                                                           b.position_ids, b.width, share_prompts=share, sample=vib)
                                (policy_term(b, logits, tokens) + critic_term(b, out.values, tokens)).backward()
                            else:
                                policy_term(b, policy_logits(b), tokens).backward()
                                critic_term(b, values(b), tokens).backward()
                        step(0, policy)
                        step(1, critic)
                    continue
                if train_policy:
                    with timed("update_policy"):
                        for b in micro_batches:
                            policy_term(b, policy_logits(b), tokens).backward()
                        step(0, policy)
                if train_critic:
                    with timed("update_critic"):
                        for b in micro_batches:
                            critic_term(b, values(b), tokens).backward()
                        step(1, critic)
    return times


@contextmanager
def profiled(args: argparse.Namespace):
    """``torch.profiler`` around the training run with ``--profile`` (its overhead inflates the timings), else None."""
    if not args.profile:
        yield None
        return
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.accelerator in ("gpu", "cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        yield prof


def child_target(only: str) -> tuple[str, str]:
    """``--only ALGORITHM[:BACKEND]`` (the child mode's row) as (algorithm, backend); the sampler defaults to ours."""
    algorithm, _, backend = only.partition(":")
    return algorithm, backend or "loop"


def measure(algorithm: str, args: argparse.Namespace, backend: str = "loop") -> dict:
    """Trains one algorithm for 1 + ``iters`` rollout batches with ``backend``'s sampler, then replays them as the
    lower bound."""
    import torch

    cli = build_cli(algorithm, args, backend)
    system, trainer = cli.model, cli.trainer
    timer = PhaseTimer()
    trainer.callbacks.append(timer.callback)
    cuda = args.accelerator in ("gpu", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS(enabled=not args.isolated_child) as rss, profiled(args) as prof:
        trainer.fit(system, datamodule=cli.datamodule)
    if prof is not None:
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(f"\n## torch.profiler: {algorithm}, every rollout batch of the run, top 20 operators by self time\n")
        print(prof.key_averages().table(sort_by=sort, row_limit=20))
    peak = torch.cuda.max_memory_allocated() if cuda else (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if args.isolated_child else rss.peak)
    bounds = [lower_bound(system, trainer, cap) for cap in timer.captures]  # [0] is the warm-up
    tokens = [float(cap["rollout"].mask.sum()) for cap in timer.captures[1:]]
    record = {"algorithm": algorithm, "backend": backend, "peak_bytes": peak,
              "samples": timer.captures[0]["rollout"].size, "tokens": statistics.median(tokens), "framework": [],
              "bound": bounds[1:], "warmup_s": timer.warmup}
    if backend == "vllm":  # the first sync loads every weight into the fresh engine; the others follow updates
        record["engine_s"], record["sync_s"] = system.sampler.engine_seconds, system.sampler.sync_seconds[1:]
    for it in timer.iterations:
        record["framework"].append({
            "iteration": it["iteration"], "generation": it["generation"],
            "frozen": it["rollout"] - it["generation"], "score": it["score"],
            **{phase: it.get(phase, 0.0) for phase in ("update_policy", "update_critic", "update_fused")},
            "other": it["iteration"] - it["rollout"] - it["score"] - it.get("update_policy", 0.0)
            - it.get("update_critic", 0.0) - it.get("update_fused", 0.0)})
    by_phase = [phase_flops(system, cap["rollout"]) for cap in timer.captures[1:]]
    record["flops"] = statistics.median(sum(p.values()) for p in by_phase)
    record["phase_flops"] = {k: statistics.median(p[k] for p in by_phase) for k in by_phase[0]}
    done = [phase_flops(system, cap["rollout"], prompts_once=True) for cap in timer.captures[1:]]
    record["done_flops"] = {k: statistics.median(p[k] for p in done) for k in done[0]}
    record["dtype"] = str(system.model_dtype).removeprefix("torch.")
    del cli, system, trainer, timer
    gc.collect()
    return record


def measure_policy_alone(args: argparse.Namespace) -> dict:
    """Peak memory of the LoRA policy alone: weights, one ``generate`` of the rollout's shape, one mini-batch
    forward/backward."""
    import torch

    from vrpo_pl.lora import LoRASpec, apply_lora
    from vrpo_pl.rollout import tokenize_prompts

    cli = build_cli("grpo", args)
    system, datamodule = cli.model, cli.datamodule
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    cuda = args.accelerator in ("gpu", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS(enabled=not args.isolated_child) as rss:
        policy = apply_lora(system.policy_source.causal_lm(system.model_dtype), LoRASpec(**LORA), causal_lm=True)
        policy.to(device)
        input_ids, mask = tokenize_prompts(system.tokenizer, list(batch["prompt"]), system.prompt)
        input_ids, mask = input_ids.to(device), mask.to(device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision.startswith("bf16"))
        with torch.no_grad(), autocast:
            tok = system.tokenizer
            out = policy.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=True, top_k=0,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        with autocast:
            logits = policy(input_ids=out[: args.mini_batch], logits_to_keep=args.new_tokens + 1).logits
            loss = torch.log_softmax(logits.float(), -1).mean()
        loss.backward()
    peak = torch.cuda.max_memory_allocated() if cuda else (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if args.isolated_child else rss.peak)
    return {"algorithm": "policy alone", "peak_bytes": peak}


def run_isolated(name: str, argv: list[str]) -> dict:
    """Measures ``name`` (an algorithm or ``policy``) in a fresh Python process; returns its record."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        cmd = [sys.executable, __file__, *argv, "--only", name, "--child-out", str(out)]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------- report
def _median(rows: list[dict], key: str) -> float:
    return statistics.median(row.get(key, 0.0) for row in rows) if rows else float("nan")


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def report(records: list[dict], args: argparse.Namespace, header: str, peaks: dict[str, float]) -> str:
    dtypes = sorted({rec["dtype"] for rec in records if "dtype" in rec})
    lines = [header, "",
             f"Matrix-multiply peak measured in this run: fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s, bf16 "
             f"{peaks['bf16'] / 1e9:,.0f} GFLOP/s. Weights: {', '.join(dtypes)}; the compute bound uses the bf16 peak "
             "for bf16 weights or bf16 precision, else fp32.", "",
             "| algorithm | s / rollout batch | generation | frozen passes | scoring | policy update | critic update "
             "| fused update | other | lower bound | ratio | samples/s | tokens/s | gen tokens/s | peak memory | TFLOP "
             "| compute bound | x bound | warm-up s |",
             "|---|" + "---:|" * 18]
    bound_lines = ["", "Lower bound (bare model calls, same shapes), seconds:", "",
                   "| algorithm | generation | frozen passes | scoring | policy update | critic update | fused update "
                   "| total |",
                   "|---|" + "---:|" * 7]
    phase_lines = ["", "Compute bound by phase (the phase's seconds over its own arithmetic at the same peak; "
                   "no-gradient passes include scoring, the update the policy's, critic's and fused steps):", "",
                   "| algorithm | generation s | its bound s | x | no-gradient passes s | their bound s | x | update s "
                   "| its bound s | x |",
                   "|---|" + "---:|" * 9]
    done_header = ["", "The arithmetic the passes do (phase_flops with prompts_once: each distinct prompt once where "
                   "the passes share prompts; the tables above count every row's prompt), at the same peak:", "",
                   "| algorithm | TFLOP done | its bound s | x | generation x | no-gradient passes x | update x |",
                   "|---|" + "---:|" * 6]
    done_rows = []  # reports from before the prompts_once count have none
    for rec in records:
        if "framework" not in rec:
            lines.append(f"| {rec['algorithm']} (reference) |" + " |" * 13 + f" {_mb(rec['peak_bytes'])} | | | | |")
            continue
        fw, lb = rec["framework"], rec["bound"]
        for row in lb:
            row["total"] = sum(row.get(k, 0.0) for k in PHASES)
        it, bound = _median(fw, "iteration"), _median(lb, "total")
        gen = _median(fw, "generation")
        cells = [f"{it:.3f}", *(f"{_median(fw, k):.3f}" for k in [*PHASES, "other"]), f"{bound:.3f}",
                 f"**{it / bound:.2f}**", f"{rec['samples'] / it:.1f}", f"{rec['tokens'] / it:.0f}",
                 f"{rec['tokens'] / gen:.0f}", _mb(rec["peak_bytes"])]
        bf16 = rec.get("dtype") == "bfloat16" or "bf16" in args.precision
        peak = peaks["bf16" if bf16 else "fp32"]
        compute = rec["flops"] / peak
        cells += [f"{rec['flops'] / 1e12:.2f}", f"{compute:.3f}", f"**{it / compute:.1f}**",
                  f"{rec.get('warmup_s', float('nan')):.1f}"]
        lines.append(f"| {_label(rec)} | " + " | ".join(cells) + " |")
        if "phase_flops" in rec:
            seconds = {"generation": gen, "frozen": _median(fw, "frozen") + _median(fw, "score"),
                       "update": sum(_median(fw, k) for k in ("update_policy", "update_critic", "update_fused"))}
            phase_cells = []
            for phase in ("generation", "frozen", "update"):
                floor = rec["phase_flops"][phase] / peak
                phase_cells += [f"{seconds[phase]:.3f}", f"{floor:.4g}",
                                f"**{seconds[phase] / floor:.1f}**" if floor > 0 else "-"]
            phase_lines.append(f"| {_label(rec)} | " + " | ".join(phase_cells) + " |")
            if "done_flops" in rec:
                done = rec["done_flops"]
                total = sum(done.values()) / peak
                ratios = [it / total] + [seconds[k] / (done[k] / peak) if done[k] > 0 else None
                                         for k in ("generation", "frozen", "update")]
                done_rows.append(f"| {_label(rec)} | {total * peak / 1e12:.2f} | {total:.4g} | " + " | ".join(
                    f"**{x:.1f}**" if x is not None else "-" for x in ratios) + " |")
        bound_lines.append(f"| {_label(rec)} | " + " | ".join(f"{_median(lb, k):.3f}" for k in [*PHASES, "total"])
                           + " |")
    notes = ["", "Medians over the measured rollout batches (warm-up excluded). ratio = s / rollout batch divided by "
             "the lower bound (goal <= 1.15). tokens/s: response tokens per second of the whole iteration; gen "
             "tokens/s: per second of generation. TFLOP: the step's matrix arithmetic (benchmarks/throughput.py "
             "step_flops); compute bound: TFLOP / the measured peak, in seconds; x bound: s / rollout batch over the "
             "compute bound; warm-up s: the first rollout batch, which pays any compilation. Peak memory: " + (
                 "torch.cuda.max_memory_allocated." if args.accelerator in ("gpu", "cuda") else
                 "peak RSS of a fresh process per row." if args.isolate else
                 "peak RSS sampled during the run (one shared process)."), ""]
    done_lines = done_header + done_rows if done_rows else []
    return "\n".join(lines + phase_lines + done_lines + bound_lines + notes + backend_table(records))


def _label(rec: dict) -> str:
    return rec["algorithm"] if rec.get("backend", "loop") == "loop" else f"{rec['algorithm']} [{rec['backend']}]"


def backend_table(records: list[dict]) -> list[str]:
    """Generation of each algorithm with each sampler, side by side (only with more than one backend)."""
    rows = [rec for rec in records if "framework" in rec]
    backends = list(dict.fromkeys(rec["backend"] for rec in rows))
    if len(backends) < 2:
        return []
    lines = ["Samplers side by side (medians over the measured rollout batches):", "",
             "| algorithm | " + " | ".join(f"{b}: generation s | {b}: samples/s (generation) | {b}: s / rollout "
                                         f"batch" for b in backends) + " | vllm: engine start s | vllm: sync s |",
             "|---|" + "---:|" * (3 * len(backends) + 2)]
    for algorithm in dict.fromkeys(rec["algorithm"] for rec in rows):
        cells = []
        for backend in backends:
            rec = next((r for r in rows if r["algorithm"] == algorithm and r["backend"] == backend), None)
            gen = _median(rec["framework"], "generation") if rec else float("nan")
            cells += [f"{gen:.2f}", f"{rec['samples'] / gen:.1f}" if rec else "",
                      f"{_median(rec['framework'], 'iteration'):.2f}" if rec else ""]
        vllm = next((r for r in rows if r["algorithm"] == algorithm and r["backend"] == "vllm"), {})
        sync = statistics.median(vllm["sync_s"]) if vllm.get("sync_s") else float("nan")
        cells += [f"{vllm.get('engine_s', float('nan')):.1f}", f"{sync:.3f}"]
        lines.append(f"| {algorithm} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot_report(report_path: Path, png_path: Path) -> None:
    """Draws a report's phase tables (framework and lower bound, per algorithm) as stacked bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[str, dict[str, dict[str, float]]] = {}
    section: str | None = "framework"
    for line in report_path.read_text().splitlines():
        if line.startswith("Lower bound"):
            section = "bound"
        elif line.startswith("Compute bound by phase"):
            section = None  # not a phase table of seconds
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if section is None or len(cells) < 6 or cells[0] in ("algorithm", "") or cells[0].startswith("---"):
            continue
        if "reference" in cells[0]:
            continue
        try:
            width = 9 if section == "framework" else 7  # total + 6 phases + other; 6 phases
            values = [float(c.replace(",", "").split()[0]) for c in cells[1:width]]
        except (ValueError, IndexError):
            continue
        names = [*PHASES, "other"] if section == "framework" else PHASES
        offset = 1 if section == "framework" else 0  # the framework table starts with the total
        rows.setdefault(cells[0], {})[section] = dict(zip(names, values[offset:], strict=False))
    if not rows:
        raise ValueError(f"no phase table in {report_path}; pass a report written by --out")
    fig, ax = plt.subplots(figsize=(10, 4.5))
    colors = plt.cm.tab10.colors
    labels, x = [], 0
    for algorithm, sections in rows.items():
        for section in ("framework", "bound"):
            bottom = 0.0
            for i, (phase, value) in enumerate(sections.get(section, {}).items()):
                ax.bar(x, value, bottom=bottom, color=colors[i], label=phase if x == 0 else None)
                bottom += value
            ax.text(x, bottom, f"{bottom:.0f} s", ha="center", va="bottom", fontsize=8)
            labels.append(f"{algorithm}\n{'framework' if section == 'framework' else 'lower bound'}")
            x += 1
        x += 0.5
    ax.set_xticks([i + 0.5 * (i // 2) for i in range(len(labels))], labels, fontsize=8)
    ax.set(ylabel="seconds per rollout batch", title=f"Phases of a rollout batch: {report_path.name}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="TinyLM instead of SmolLM2-135M-Instruct")
    p.add_argument("--size", choices=["base", "large"], default="base", help="workload size (see the docstring)")
    p.add_argument("--model-path", help="a local Hugging Face model directory instead of SmolLM2 (a second size)")
    p.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=ALGORITHMS)
    p.add_argument("--backends", nargs="+", choices=["loop", "hf", "vllm"], default=["loop"],
                   help="samplers to measure each algorithm with (--model.generation.backend), side by side")
    p.add_argument("--iters", type=int, default=3, help="measured rollout batches (after one warm-up)")
    p.add_argument("--prompts", type=int, help="prompts per rollout batch (default: the size's)")
    p.add_argument("--samples", type=int, help="samples per prompt (default: the size's)")
    p.add_argument("--new-tokens", type=int, help="max new tokens (default: the size's)")
    p.add_argument("--mini-batch", type=int, help="PPO mini-batch size (default: the size's)")
    p.add_argument("--epochs", type=int, default=2, help="PPO epochs")
    p.add_argument("--critic-epochs", type=int, help="the critic's passes per rollout batch "
                   "(--model.ppo.critic_epochs; default: the system's, 4; pass --epochs' value to match a commit "
                   "from before that setting, whose critic made as many passes as the policy)")
    p.add_argument("--critic-top-layers", type=int, help="the critic's LoRA on its last N layers only "
                   "(--model.critic_lora.top_layers; default: every layer)")
    p.add_argument("--shuffle", choices=["prompts", "rows"], help="how the update deals mini-batches "
                   "(--model.ppo.shuffle; default: the system's, prompts; rows for a commit from before that setting)")
    p.add_argument("--draw", choices=["cdf", "multinomial"], help="how the decode loop draws a token "
                   "(--model.generation.draw; default: the system's, cdf; multinomial for a commit from before it)")
    p.add_argument("--forward-tokens", type=int, help="--model.ppo.max_tokens_per_forward (0: null, rows of the "
                   "micro- or mini-batch, as before that setting; default: the system's, 4096)")
    p.add_argument("--lora-compute", choices=["input", "float32"], help="the dtype the adapters multiply in "
                   "(--model.lora.compute; default: the system's, input; float32 for a commit from before it)")
    p.add_argument("--compile", action="store_true", help="--model.compile: torch.compile the decoder layers' "
                   "blocks for the update's passes (the warm-up rollout batch pays the compilation)")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="auto",
                   help="weights' dtype (--model.dtype; auto: bf16 base weights where the hardware has bf16 units)")
    p.add_argument("--share-prompt-prefix", action=argparse.BooleanOptionalAction, default=True,
                   help="--model.ppo.share_prompt_prefix and --model.generation.share_prompt_prefill (the lower "
                        "bound's frozen and update passes follow it)")
    p.add_argument("--pack-rows", action=argparse.BooleanOptionalAction, default=True,
                   help="--model.ppo.pack_rows (the lower bound's frozen and update passes follow it)")
    p.add_argument("--fuse-update", action=argparse.BooleanOptionalAction, default=True,
                   help="--model.ppo.fuse_update (the lower bound's update passes follow it)")
    p.add_argument("--lean-decode", action=argparse.BooleanOptionalAction, default=True,
                   help="--model.generation.lean_decode (the lower bound calls the same sampler)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="measure each row in a fresh process (exact peak RSS on the CPU)")
    p.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler's top operators per algorithm (slows the run; timings inflated)")
    p.add_argument("--plot", type=Path, metavar="REPORT_MD",
                   help="only draw REPORT_MD's phase tables (a report written by --out) to REPORT_MD's .png")
    p.add_argument("--only", help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = SIZES["tiny" if args.tiny else args.size]
    for name, value in zip(("prompts", "samples", "new_tokens", "mini_batch"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.isolated_child = args.child_out is not None
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.plot:
        plot_report(args.plot, args.plot.with_suffix(".png"))
        print(f"wrote {args.plot.with_suffix('.png')}")
        return 0
    import torch

    from vrpo_pl.lora import LoRASpec
    from vrpo_pl.rollout import GenerationSettings
    from vrpo_pl.settings import PPOSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.isolated_child:
        algorithm, backend = child_target(args.only)
        record = measure_policy_alone(args) if args.only == "policy" else measure(algorithm, args, backend)
        args.child_out.write_text(json.dumps(record))
        return 0
    names = [*(f"{a}:{b}" for a in args.algorithms for b in args.backends), "policy"]
    if args.isolate:
        records = [run_isolated(name, argv) for name in names]
    else:
        records = [measure_policy_alone(args) if n == "policy" else measure(n.split(":")[0], args, n.split(":")[1])
                   for n in names]
    model = "TinyLM" if args.tiny else args.model_path or "SmolLM2-135M-Instruct"
    critic_epochs = args.critic_epochs if args.critic_epochs is not None else PPOSettings().critic_epochs
    device = torch.cuda.get_device_name() if args.accelerator in ("gpu", "cuda") else (
        f"CPU, {args.threads or torch.get_num_threads()} torch threads")
    header = (f"# Throughput: {model} + LoRA r={LORA['r']} (q/k/v/o), B = {args.prompts} x {args.samples} = "
              f"{args.prompts * args.samples} responses, {args.new_tokens} new tokens, {args.epochs} PPO epochs, "
              f"critic epochs {critic_epochs}, mini-batch {args.mini_batch} "
              f"(shuffled by {args.shuffle or PPOSettings().shuffle}), adapters multiplying in "
              f"{args.lora_compute or LoRASpec().compute}, no-gradient passes of at most "
              f"{args.forward_tokens if args.forward_tokens is not None else PPOSettings().max_tokens_per_forward} "
              "tokens (0: the mini-batch's rows), "
              f"tokens drawn by {args.draw or GenerationSettings().draw}, "
              f"shared prompt prefix {'on' if args.share_prompt_prefix else 'off'}, "
              f"packed rows {'on' if args.pack_rows else 'off'}, "
              f"fused update passes {'on' if args.fuse_update else 'off'}, "
              f"lean decode steps {'on' if args.lean_decode else 'off'}"
              f"\n\n{device}, precision {args.precision}, {args.iters} measured rollout "
              f"batches after 1 warm-up. Command: `python benchmarks/throughput.py {' '.join(argv)}`")
    peaks = {name: matmul_peak(name, device="cuda" if args.accelerator in ("gpu", "cuda") else "cpu")
             for name in ("fp32", "bf16")}
    text = report(records, args, header, peaks)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        plot_report(args.out, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
