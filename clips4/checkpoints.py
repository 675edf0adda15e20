"""What a loaded checkpoint file holds, read one way for every model clips4 loads from a user's file."""

from __future__ import annotations

from typing import Any


def unwrap_state_dict(loaded: Any) -> dict[str, Any] | None:
    """The state dict inside what ``torch.load`` returned: the object itself or its ``state_dict`` entry (training
    scripts save both ways), names without DDP's ``module.`` prefix; None when it holds no dict."""
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        return None
    return {str(k).removeprefix("module."): v for k, v in loaded.items()}
