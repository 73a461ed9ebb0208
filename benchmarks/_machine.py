"""One line naming the machine a benchmark ran on.

Training figures are reproducible on one machine, run after run, but not across CPUs: PyTorch
picks its CPU kernels by instruction set (AVX2, AVX-512, ...), their float results differ in the
last bits, and over a study those differences can flip a pruning decision and with it the
sampler's next move. Figures from two machines are compared by their ratios, not digit by digit.
"""

from __future__ import annotations

import os
import platform


def describe() -> str:
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return (
        f"machine: {model}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
        f"CPU kernels {torch.backends.cpu.get_cpu_capability()}"
    )
