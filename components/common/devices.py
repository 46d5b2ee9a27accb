"""Which device a component runs on, and the precision it computes in there."""

from __future__ import annotations

import os

import torch


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; otherwise the device named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def mixed_precision(device: torch.device) -> torch.autocast:
    """bf16 autocast on a GPU, float32 on a CPU: the one precision that training, evaluation and
    the benchmarks compute in. A reusable context: ``with mixed_precision(device): ...``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def describe_device(device: torch.device) -> str:
    """The device in words, for reports: the GPU's name, or the CPU and its cores."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
