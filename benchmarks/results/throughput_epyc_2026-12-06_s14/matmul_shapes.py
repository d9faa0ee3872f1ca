"""GFLOP/s of (rows x k) @ (k x n) over SmolLM2-135M's layer shapes, float32 and bf16, 2 threads (the table in
matmul_shapes.md beside this file): is throughput.py's matmul_peak shape near the machine's best? Each figure is
``benchmarks/throughput.py``'s :func:`matmul_peak` at that shape.

    .venv/bin/python benchmarks/results/throughput_epyc_2026-12-06_s14/matmul_shapes.py
"""

import importlib.util
from pathlib import Path

import torch

SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152))  # q/o, k/v, MLP up, MLP down, LM head


def _throughput():
    """benchmarks/throughput.py loaded as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[2] / "throughput.py"
    spec = importlib.util.spec_from_file_location("throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    torch.set_num_threads(2)
    matmul_peak = _throughput().matmul_peak
    for name in ("fp32", "bf16"):
        for rows in (256, 1024, 2560):
            cells = [f"{k}x{n}:{matmul_peak(name, shape=(rows, k, n), reps=2 if n > 40000 else 10) / 1e9:.0f}"
                     for k, n in SHAPES]
            print(name, rows, " ".join(cells), flush=True)
