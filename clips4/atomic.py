"""One way to write a file: through a temporary file in the same folder and a rename, so a killed run leaves either
the old file or the new one, never a truncated one that a rerun would trust."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it onto ``path``.

    The temporary name carries the process id, so two processes writing the same file never share a half-written one.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
