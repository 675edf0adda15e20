"""The two data types every dataset adapter produces: image records and class metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = 255


@dataclass(frozen=True)
class Record:
    """One image of a split. Paths are absolute; ``label_path`` is None for unlabelled data."""

    image_id: str
    split: str
    image_path: str
    label_path: str | None = None
    caption: str | None = None


@dataclass(frozen=True)
class ClassInfo:
    """Class metadata, index = class id. ``synonyms[i][0]`` is the display name of class i."""

    synonyms: list[list[str]]
    held_out: list[bool]
    palette: np.ndarray = field(repr=False)
    ignore_index: int = IGNORE_INDEX

    @property
    def names(self) -> list[str]:
        return [s[0] for s in self.synonyms]

    @property
    def num_classes(self) -> int:
        return len(self.synonyms)

    @property
    def known_ids(self) -> list[int]:
        return [i for i, h in enumerate(self.held_out) if not h]

    @property
    def held_out_ids(self) -> list[int]:
        return [i for i, h in enumerate(self.held_out) if h]
