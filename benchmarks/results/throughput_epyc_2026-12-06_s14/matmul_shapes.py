"""GFLOP/s of (rows x k) @ (k x n) over SmolLM2-135M's layer shapes, float32 and bf16, 2 threads (the table in
matmul_shapes.md beside this file): is throughput.py's matmul_peak shape near the machine's best?

    .venv/bin/python benchmarks/results/throughput_epyc_2026-12-06_s14/matmul_shapes.py
"""

import time

import torch

SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152))  # q/o, k/v, MLP up, MLP down, LM head


def gflops(m: int, k: int, n: int, dtype: torch.dtype, reps: int = 5) -> float:
    """Best of 3 timings of ``reps`` products after 2 warm-ups."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * m * k * n / best / 1e9


if __name__ == "__main__":
    torch.set_num_threads(2)
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (256, 1024, 2560):
            cells = [f"{k}x{n}:{gflops(rows, k, n, dtype, reps=2 if n > 40000 else 10):.0f}" for k, n in SHAPES]
            print(dtype, rows, " ".join(cells), flush=True)
