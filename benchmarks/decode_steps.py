"""Decode microbenchmark: the ``loop`` sampler's generation with lean decode steps (``--model.generation.
lean_decode``, :mod:`vrpo_pl.decode`) and with the model's own forward per step, over the same prompts, and the floor
a decode step cannot go below on this machine: its matrix products alone.

Workload (default): SmolLM2-135M-Instruct + LoRA r=16 alpha=32 on q/k/v/o (the adapters' B matrices moved off zero,
as after training, so that merging them is real work), ``--prompts`` 8 prompts of ``configs/data/arithmetic.jsonl``
with the chat template x ``--samples`` 4, ``--new-tokens`` 32 drawn at temperature 1 with an EOS that never comes
(every row decodes every step). ``--tiny``: TinyLM.

Reported (medians of ``--rounds`` rotating rounds after one warm-up of each): seconds per generation, its prefill
(the model's own forward either way) and its decode steps per step; the **matrix floor**: one decode step's
products (every layer's q/k/v/o/gate/up/down and the LM head, the batch's rows, bf16 or float32 as the weights)
timed back to back over distinct weight tensors, so the weights stream from memory as in a real step. A step's
time over the floor is what the operator calls around the products cost.

    python benchmarks/decode_steps.py                       # SmolLM2, 8 x 4 rows, 32 new tokens, bf16
    python benchmarks/decode_steps.py --dtype float32 --rounds 5
    python benchmarks/decode_steps.py --tiny --rounds 1     # seconds: the script runs
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _sibling(name: str):
    """Another script of benchmarks/ loaded as a module (they are scripts, not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build(args: argparse.Namespace):
    """``(tokenizer, policy, input_ids, attention_mask)``: the policy as RLSystem builds it, its adapters off zero,
    and the left-padded prompts x samples."""
    import torch

    passes = _sibling("prefix_passes")
    tokenizer, policy, _, r = passes.build(argparse.Namespace(
        tiny=args.tiny, dtype=args.dtype, prompts=args.prompts, samples=args.samples, new_tokens=1))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
    return tokenizer, policy, r.sequences[:, : r.prompt_width], r.attention_mask[:, : r.prompt_width]


def generate(policy, tokenizer, input_ids, attention_mask, new_tokens: int, lean: bool) -> dict[str, float]:
    """One generation: seconds in all, in the prefill, and per decode step."""
    import torch

    import vrpo_pl.sampling
    from vrpo_pl.rollout import GenerationSettings

    prefill = vrpo_pl.sampling._prefill
    spent = {}

    def timed_prefill(*a, **k):
        start = time.perf_counter()
        out = prefill(*a, **k)
        spent["prefill"] = time.perf_counter() - start
        return out

    vrpo_pl.sampling._prefill = timed_prefill
    try:
        torch.manual_seed(0)
        start = time.perf_counter()
        vrpo_pl.sampling.LoopSampler().sample(
            policy, input_ids, attention_mask, GenerationSettings(max_new_tokens=new_tokens, lean_decode=lean),
            -1, tokenizer.pad_token_id)
        total = time.perf_counter() - start
    finally:
        vrpo_pl.sampling._prefill = prefill
    return {"total": total, "prefill": spent["prefill"], "step": (total - spent["prefill"]) / max(new_tokens - 1, 1)}


def matrix_floor(policy, rows: int, repeats: int = 5) -> float:
    """Seconds of one decode step's matrix products over weights of the policy's shapes and dtype, each its own
    tensor (streamed from memory as in a step), for ``rows`` rows; the median of ``repeats``."""
    import torch
    import torch.nn.functional as F

    from vrpo_pl.decode import LeanDecoder

    lean = LeanDecoder.build(policy)
    if lean is None:
        raise SystemExit("decode_steps.py: the policy is not a Llama-architecture model (see vrpo_pl.decode)")
    weights = [w.detach().clone() for layer in lean.layers
               for w in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down)]
    weights.append(lean.head.detach().clone())
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for w in weights:
                F.linear(inputs[w.shape[1]], w)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def report(times: dict[str, list[dict[str, float]]], floor: float, args: argparse.Namespace, header: str) -> str:
    """The Markdown table of the medians."""
    lines = [header, "", "| decode steps | s / generation | prefill s | ms / step | matrix floor ms / step | "
             "step / floor |", "|---|---:|---:|---:|---:|---:|"]
    for name, runs in times.items():
        total, prefill, step = (statistics.median(r[k] for r in runs) for k in ("total", "prefill", "step"))
        lines.append(f"| {name} | {total:.3f} | {prefill:.3f} | {step * 1e3:.1f} | {floor * 1e3:.1f} | "
                     f"{step / floor:.2f} |")
    lines += ["", f"Medians of {args.rounds} rotating rounds after one warm-up of each; {args.new_tokens - 1} decode "
              "steps after the prefill (the first token comes from the prefill's logits)."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _sibling("prefix_passes").workload_parser(__doc__.split("\n\n")[0], new_tokens=32, dtype="bfloat16")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.rounds < 1:
        p.error("--new-tokens must be >= 2 and --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    passes = _sibling("prefix_passes")
    start = passes.load_line(passes.busy_cores())  # before this process adds its own threads
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, policy, input_ids, attention_mask = build(args)
    variants = {"lean (vrpo_pl.decode)": True, "the model's forward": False}
    times: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    names = list(variants)
    for name in names:  # warm-up
        generate(policy, tokenizer, input_ids, attention_mask, args.new_tokens, variants[name])
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            times[name].append(generate(policy, tokenizer, input_ids, attention_mask, args.new_tokens,
                                        variants[name]))
    floor = matrix_floor(policy, input_ids.shape[0])
    model = "TinyLM" if args.tiny else "SmolLM2-135M-Instruct"
    header = (f"# Decode steps: {model} + LoRA r=16 (q/k/v/o), {input_ids.shape[0]} rows "
              f"({args.prompts} prompts x {args.samples}), prompts of {input_ids.shape[1]} tokens (left-padded), "
              f"{args.new_tokens} new tokens, {args.dtype} weights\n\n"
              f"{passes.machine_line()}; at start: {start}. Command: `python benchmarks/decode_steps.py "
              f"{' '.join(sys.argv[1:] if argv is None else argv)}`")
    text = report(times, floor, args, header)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
