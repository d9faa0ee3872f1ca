"""Pass microbenchmark: seconds of each pass plain, with shared prompts (``--model.ppo.share_prompt_prefix``) and
packed (``--model.ppo.pack_rows``, for each ``--pack-tokens`` size), over the same rows.

Workload (default): SmolLM2-135M-Instruct (``vrpo_pl.models.SmolLM2``, offline), LoRA r=16 alpha=32 on q/k/v/o for
the policy and the critic (plain value head; the critic's body on the policy's frozen base tensors, as RLSystem
builds it), ``--prompts`` 8 prompts of ``configs/data/arithmetic.jsonl`` with the chat template x ``--samples`` 4,
``--new-tokens`` 16 sampled at temperature 1 by the loop sampler (real, ragged responses). ``--tiny``: TinyLM.

Each pass runs over the rollout in micro-batches of ``--chunk`` rows, trimmed as the system trims them, the same
rows in every variant (``plain``: every row computes its prompt and padding; ``shared``: each distinct prompt once,
:mod:`vrpo_pl.prefix`; ``packed N``: the real tokens in packs of up to N tokens, :mod:`vrpo_pl.packing`):

- ``reference`` (no gradient): the adapter-disabled policy's logits and log-probs, in the rollout's slices (rows in
  prompt order, what ``score_rollout`` does);
- ``values`` (no gradient): the critic's values, same slices;
- ``policy_grad``: the policy's forward + backward of the responses' log-likelihood, over a shuffled mini-batch's
  micro-batches formed prompt by prompt (what the update does; eager attention with bf16 weights on CPU, as there);
- ``critic_grad``: the critic's forward + backward of a squared error, same micro-batches;
- ``fused_grad``: both, the packed variants as one fused call per micro-batch (:mod:`vrpo_pl.fused`,
  ``--model.ppo.fuse_update``, which feeds the tokens listed twice, in one call), the others as the two passes one
  after the other: compare it with ``policy_grad`` + ``critic_grad`` of the same variant.

Rounds rotate over the variants (A B C, B C A, ...) after one warm-up round of each, so contention drifts over all
alike; medians are reported with the tokens each pass feeds the model. Before timing it prints the CPU, the load
average, whether ``/work/scratch/BUSY`` is present (another job on the machine) and how many cores other processes
kept busy over one second while it slept (:func:`busy_cores`; the load average trails by a minute, so it still counts
a benchmark that has just ended): figures taken with other work running are contended.
On a loaded 2-core machine use ``--threads 1``: with torch's 2 threads every small operator waits for the busy core
(measured: ~5 ms per elementwise op instead of ~50 us), so the shared pass, which calls the model twice, measured
slower than the plain one (16.7 s against 10.8 s for one micro-batch) while with 1 thread it was faster (1.6 s
against 2.7 s).

    python benchmarks/prefix_passes.py                       # SmolLM2, 8 x 4, 16 new tokens, micro-batches of 8
    python benchmarks/prefix_passes.py --chunk 32 --rounds 5 --dtype bfloat16
    python benchmarks/prefix_passes.py --dtype bfloat16 --new-tokens 32 --pack-tokens 128 256 512   # pack sizes
    python benchmarks/prefix_passes.py --tiny --rounds 1     # seconds: the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PASSES = ["reference", "values", "policy_grad", "critic_grad", "fused_grad"]
LORA = {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
BUSY = Path("/work/scratch/BUSY")


def machine_line() -> str:
    """The CPU model and torch's threads, for the report's header."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def busy_cores(seconds: float = 1.0) -> float | None:
    """How many cores were busy over the next ``seconds`` while this process sleeps: the work of other processes
    (and a VM's stolen time), from ``/proc/stat``; None where it cannot be read. Unlike the load average, which
    trails by a minute, it does not count a benchmark that has just ended."""
    def snapshot() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(values), values[3] + values[4]  # all jiffies, idle + iowait

    try:
        total, idle = snapshot()
        time.sleep(seconds)
        total_after, idle_after = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    spent = total_after - total
    return (os.cpu_count() or 1) * (1 - (idle_after - idle) / spent) if spent > 0 else None


def load_line(busy: float | None = None) -> str:
    """The 1-minute load average, whether ``/work/scratch/BUSY`` (another job running) is present and, when given,
    ``busy`` (:func:`busy_cores`) with a contention mark above half a core."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    line = f"load average {load:.2f}, {BUSY} {'present' if BUSY.exists() else 'absent'}"
    if busy is not None:
        contended = " (contended)" if busy > 0.5 else ""
        line += f", {busy:.2f} of {os.cpu_count()} cores busy with other work over 1 s{contended}"
    return line


def build(args: argparse.Namespace):
    """``(tokenizer, policy, critic, rollout)``: the models as RLSystem builds them and one sampled rollout batch."""
    import torch

    from vrpo_pl.lora import LoRASpec
    from vrpo_pl.models import SmolLM2, TinyLM, build_models, with_pad_token
    from vrpo_pl.rollout import GenerationSettings, PromptSettings, sample_rollout
    from vrpo_pl.sampling import LoopSampler
    from vrpo_pl.settings import CriticSettings

    source = TinyLM() if args.tiny else SmolLM2()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    lora = LoRASpec(**LORA)
    policy, _, critic = build_models(source, dtype, lora, critic=CriticSettings(vib=False, aux="none"),
                                     critic_lora=lora)
    tokenizer = with_pad_token(source.tokenizer())
    lines = (REPO_ROOT / "configs" / "data" / "arithmetic.jsonl").read_text().splitlines()[: args.prompts]
    prompts = [json.loads(line)["prompt"] for line in lines for _ in range(args.samples)]
    torch.manual_seed(0)
    r = sample_rollout(LoopSampler(), policy, tokenizer, prompts, PromptSettings(), GenerationSettings(
        max_new_tokens=args.new_tokens), torch.device("cpu"))
    r.group = torch.arange(args.prompts).repeat_interleave(args.samples)
    return tokenizer, policy, critic, r


def micro_batches(r, chunk: int, update: bool) -> list:
    """The rollout's slices (``update`` False) or a shuffled mini-batch of the whole rollout cut prompt by prompt into
    micro-batches of ``chunk`` rows (``update`` True), each trimmed (:func:`vrpo_pl.rollout.micro_batch`)."""
    import torch

    from vrpo_pl.rollout import micro_batch, split_micro_batches

    if not update:
        return [micro_batch(r, torch.arange(s, min(s + chunk, r.size))) for s in range(0, r.size, chunk)]
    order = torch.randperm(r.size, generator=torch.Generator().manual_seed(0))
    return [micro_batch(r, rows) for rows in split_micro_batches(r, order, chunk, None, by_prompt=True)]


def variants(pack_tokens: list[int]) -> list[str]:
    """The variants timed: ``plain``, ``shared`` and ``packed N`` for each pack size."""
    return ["plain", "shared", *(f"packed {n}" for n in pack_tokens)]


@contextmanager
def variant_settings(variant: str):
    """``(prompt sharing, packing)`` of a variant, with its pack size set for the duration."""
    import vrpo_pl.packing

    default = vrpo_pl.packing.PACK_TOKENS
    if variant.startswith("packed"):
        vrpo_pl.packing.PACK_TOKENS = int(variant.split()[1])
    try:
        yield variant != "plain", variant.startswith("packed")
    finally:
        vrpo_pl.packing.PACK_TOKENS = default


def run_pass(name: str, policy, critic, r, batches: list, variant: str) -> None:
    """One pass ``name`` over ``batches`` in ``variant`` (:func:`variants`)."""
    import torch

    from vrpo_pl.fused import adapter_pairs, fusable, fused_passes
    from vrpo_pl.models import training_attention
    from vrpo_pl.passes import response_logprobs, response_token_logits

    pairs = adapter_pairs(policy, critic) if name == "fused_grad" else None

    def log_likelihood(b, logits):
        return (response_logprobs(logits, b.take(r.responses)) * b.take(r.mask)).sum()

    def squared_error(b, values):
        return ((values - 1.0) ** 2 * b.take(r.mask)).sum()

    with variant_settings(variant) as (share, pack):
        for b in batches:
            width = b.prompt_width if share else None
            args = (b.sequences, b.attention_mask, b.position_ids, b.width)
            if name == "reference":
                with torch.no_grad(), policy.disable_adapter():
                    response_logprobs(response_token_logits(policy, *args, prompt_width=width, pack=pack),
                                      b.take(r.responses))
            elif name == "values":
                with torch.no_grad():
                    critic(*args, prompt_width=width, pack=pack)
            elif name == "fused_grad" and pack and fusable(policy, pairs, b.attention_mask, b.width):
                with training_attention(policy, critic):
                    logits, out = fused_passes(policy, critic, pairs, *args, share_prompts=share)
                    (log_likelihood(b, logits) + squared_error(b, out.values)).backward()
            else:  # policy_grad, critic_grad, or both (fused_grad where the system would not fuse)
                if name != "critic_grad":
                    with training_attention(policy):
                        logits = response_token_logits(policy, *args, prompt_width=width, pack=pack)
                        log_likelihood(b, logits).backward()
                if name != "policy_grad":
                    with training_attention(critic):
                        squared_error(b, critic(*args, prompt_width=width, pack=pack).values).backward()
    for model in (policy, critic):
        model.zero_grad(set_to_none=True)


def fed_tokens(batches: list, variant: str) -> tuple[int, int]:
    """``(prompt, other)`` tokens the model is fed over ``batches`` (padding included, as the passes compute it;
    packed: the packs' prompt tokens and the rest, padding of the shorter packs included)."""
    from vrpo_pl.packing import pack_rows
    from vrpo_pl.prefix import find_shared_prompts

    prompt = other = 0
    with variant_settings(variant) as (share, pack):
        for b in batches:
            if pack:
                packed = pack_rows(b.sequences, b.attention_mask, b.position_ids, b.width)
                in_prompt = int(((packed.groups >= 0) & (packed.owners < 0)).sum())
                prompt, other = prompt + in_prompt, other + packed.input_ids.numel() - in_prompt
                continue
            shared = find_shared_prompts(b.sequences, b.attention_mask, b.prompt_width) if share else None
            if shared is None:
                prompt, other = prompt + b.sequences.shape[0] * b.prompt_width, other + b.sequences.shape[0] * b.width
            else:
                prompt += len(shared.rows) * shared.split
                other += b.sequences.shape[0] * (b.sequences.shape[1] - 1 - shared.split)
    return prompt, other


def measure(policy, critic, r, chunk: int, rounds: int, names: list[str]) -> dict[str, dict[str, list[float]]]:
    """Seconds of each pass per round and variant, the variants' order rotating, after one warm-up round."""
    times: dict[str, dict[str, list[float]]] = {name: {v: [] for v in names} for name in PASSES}
    for name in PASSES:
        batches = micro_batches(r, chunk, update=name.endswith("_grad"))
        for round_ in range(rounds + 1):
            for variant in names[round_ % len(names):] + names[: round_ % len(names)]:
                start = time.perf_counter()
                run_pass(name, policy, critic, r, batches, variant)
                if round_ > 0:
                    times[name][variant].append(time.perf_counter() - start)
        print(f"{name}: " + ", ".join(f"{v} {times[name][v]}" for v in names) + f" s ({load_line()})", flush=True)
    return times


def report(times: dict, r, chunk: int, args: argparse.Namespace, header: str) -> str:
    """A Markdown table: per pass and variant, median seconds, the speed-up over plain, and the tokens fed."""
    prompt_lengths = r.attention_mask[:, : r.prompt_width].sum(1).float()
    response_lengths = r.mask.sum(1)
    lines = [
        f"# Passes plain, shared and packed: {'TinyLM' if args.tiny else 'SmolLM2-135M-Instruct'} + LoRA r=16, "
        f"{args.dtype}",
        "",
        f"- {header}",
        f"- {args.prompts} prompts x {args.samples} samples, {args.new_tokens} new tokens; prompts "
        f"{prompt_lengths.mean():.1f} tokens on average (width {r.prompt_width}), responses "
        f"{response_lengths.mean():.1f} (longest {r.responses.shape[1]}); micro-batches of {chunk} rows; median of "
        f"{args.rounds} alternating rounds",
        "",
        "| pass | variant | seconds | speed-up over plain | prompt + other tokens fed |",
        "|---|---|---|---|---|",
    ]
    for name in PASSES:
        batches = micro_batches(r, chunk, update=name.endswith("_grad"))
        plain = statistics.median(times[name]["plain"])
        for variant, seconds in times[name].items():
            median, fed = statistics.median(seconds), fed_tokens(batches, variant)
            lines.append(f"| {name} | {variant} | {median:.3f} | {plain / median:.2f}x | {fed[0]} + {fed[1]} |")
    return "\n".join(lines) + "\n"


def workload_parser(description: str, new_tokens: int, dtype: str) -> argparse.ArgumentParser:
    """The arguments this script and ``decode_steps.py`` share: the model, prompts x samples, new tokens, rounds,
    the weights' dtype, threads and the report's file."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="TinyLM instead of SmolLM2-135M-Instruct")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (G)")
    p.add_argument("--new-tokens", type=int, default=new_tokens)
    p.add_argument("--rounds", type=int, default=3, help="measured rounds of each variant (after one warm-up)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=dtype)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = workload_parser(__doc__.split("\n\n")[0], new_tokens=16, dtype="float32")
    p.add_argument("--chunk", type=int, default=8, help="rows per micro-batch (the base workload's mini-batch)")
    p.add_argument("--pack-tokens", type=int, nargs="*", default=None, metavar="N",
                   help="pack sizes of the packed variants (default: vrpo_pl.packing.PACK_TOKENS; none: no packed "
                        "variant)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    start = load_line(busy_cores())  # before this process adds its own threads
    if args.threads:
        torch.set_num_threads(args.threads)
    _, policy, critic, r = build(args)
    print(f"timing on {machine_line()}; at start: {start}", flush=True)
    from vrpo_pl.packing import PACK_TOKENS

    names = variants([PACK_TOKENS] if args.pack_tokens is None else args.pack_tokens)
    times = measure(policy, critic, r, args.chunk, args.rounds, names)
    text = report(times, r, args.chunk, args, f"{machine_line()}; at start (before this process): {start}; after "
                  f"timing (with its own threads): {load_line()}")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
