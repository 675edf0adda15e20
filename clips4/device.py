"""Device selection shared by every stage: 'auto' means CUDA when present, else CPU."""

from __future__ import annotations

import torch


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a config string into a device, refusing CUDA requests on machines without it."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} was asked for but CUDA is not available; use 'auto' or 'cpu'")
    return device
