"""What a benchmark ran on (CPU model and count, its bf16 instructions, torch and its threads, python, date), and
the best-of-n timer and matrix-multiply peak the benchmarks share."""

from __future__ import annotations

import datetime
import platform
import subprocess
import time

import torch


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    return {
        "cpu": fields.get("Model name", "?").strip(),
        "cpus": fields.get("CPU(s)", "?").strip(),
        # bf16 matrix products are fast only with these (Intel AMX, AVX-512 BF16); AVX2-only CPUs emulate them
        "bf16_flags": sorted(set(fields.get("Flags", "").split()) & {"amx_bf16", "avx512_bf16"}),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_peak(dtype: torch.dtype = torch.float32, repeats: int = 5, n: int = 4096) -> float:
    """GFLOP/s of a large square matrix product in ``dtype``: this machine's practical peak in it."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    return 2 * n**3 / best_time(lambda: a @ b, repeats) / 1e9
