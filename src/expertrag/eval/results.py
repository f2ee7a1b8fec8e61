"""Result documents (eval.json, gates.json, routing.json): format tag, JSON-safe values, the atomic writer.

Results hold NaN where a metric is undefined (e.g. AUROC over one class); on disk they are null, through
`json_safe`, so every file is strict JSON. Readers treat null as "undefined".
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from expertrag.fileio import atomic_write_text

FORMAT = "expertrag-eval"
VERSION = 1


def json_safe(obj: Any) -> Any:
    """Plain JSON values: NaN/inf -> None, numpy scalars -> Python, tuples -> lists, paths -> str."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(result: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a result as strict JSON (NaN/inf as null, via json_safe; indent 1), atomically (fileio)."""
    p = Path(path)
    atomic_write_text(p, json.dumps(json_safe(dict(result)), ensure_ascii=False, indent=1, allow_nan=False) + "\n")
    return p
