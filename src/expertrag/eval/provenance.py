"""Provenance stored in every result: package versions and the machine the numbers were measured on."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from typing import Any

PACKAGES = ("expertrag", "torch", "transformers", "sentence-transformers", "faiss-cpu", "bm25s", "numpy",
            "scikit-learn", "pydantic")


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "machine": platform.machine(), "processor": platform.processor() or None}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return info
