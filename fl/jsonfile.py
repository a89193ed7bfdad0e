"""Strict JSON for the files and lines fedsound writes: a NaN or infinite number is written as ``null`` (plain
``json.dumps`` writes ``NaN``, which most JSON readers refuse)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (also inside dicts, lists and tuples) replaced by None, and numpy
    scalars turned into Python numbers."""
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`finite` ``(value)``, refusing any NaN or Infinity left."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write :func:`dumps` ``(value)`` to ``path`` through a temporary file renamed into place: a reader never sees
    a partial file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(value, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
