"""Writes configs/data/arithmetic.jsonl: reasoning-gym chain_sum questions (1-digit, 2-3 terms) as prompt/answer.

    python scripts/make_arithmetic_jsonl.py [--out configs/data/arithmetic.jsonl] [--size 1000] [--seed 2026]
"""

from __future__ import annotations

import argparse
import json

import reasoning_gym


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="configs/data/arithmetic.jsonl")
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    dataset = reasoning_gym.create_dataset(
        "chain_sum", size=args.size, seed=args.seed, min_terms=2, max_terms=3, min_digits=1, max_digits=1
    )
    seen: set[str] = set()
    with open(args.out, "w", encoding="utf-8") as f:
        for entry in dataset:
            if entry["question"] not in seen:
                seen.add(entry["question"])
                f.write(json.dumps({"prompt": entry["question"], "answer": str(entry["answer"])}) + "\n")
    print(f"wrote {len(seen)} distinct questions to {args.out}")


if __name__ == "__main__":
    main()
