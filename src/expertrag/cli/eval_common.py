"""What the evaluation commands share: option parsing, input checks, the per-policy pipeline factory,
provenance, the policy table and writing eval.json + report.md.

Each command lives in its own module (eval_cmd, bench_pipeline, eval_gates, merge_results, eval_routing).
`load_generator` is looked up here at call time, so a test can substitute an already-loaded model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from expertrag.config import ExpertRAGConfig
from expertrag.errors import InputError


def parse_policies(text: str | None, default: list[str]) -> list[str]:
    from expertrag.gate.policies import POLICIES

    names = [p.strip() for p in (text.split(",") if text is not None else default) if p.strip()]
    if names == ["all"]:
        return list(POLICIES)
    if not names:
        raise InputError("--policies needs at least one policy")
    bad = [p for p in names if p not in POLICIES]
    if bad:
        raise InputError(f"unknown policy {', '.join(map(repr, bad))}; choose from {', '.join(POLICIES)} (or 'all')")
    return list(dict.fromkeys(names))


def parse_ks(text: str | None, default: list[int]) -> list[int]:
    if text is None:
        return list(default)
    if text.strip().lower() in ("", "none", "off"):
        return []
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise InputError(f"--k-sweep must be comma-separated integers, got {text!r}") from None
    if any(k <= 0 for k in ks):
        raise InputError("--k-sweep needs positive k")
    return ks


def check_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise InputError(f"no such {what}", path=path)
    if not path.is_file():
        raise InputError(f"not a file ({what})", path=path)
    return path


def check_index(path: Path) -> Path:
    if not path.is_dir():
        raise InputError("no such index directory (build one with `expertrag index`)", path=path)
    return path


def read_label_files(paths: list[Path]) -> dict[str, Any]:
    """id -> LabelRecord over all files; the first file naming an id wins."""
    from expertrag.gate.labels import read_labels

    out: dict[str, Any] = {}
    for p in paths:
        for r in read_labels(check_file(p, "label file")):
            out.setdefault(r.id, r)
    return out


BACKEND_HELP = "generator backend: native | transformers | llamacpp | openai | auto (overrides model.backend)"


def with_backend(config: ExpertRAGConfig, backend: str | None) -> ExpertRAGConfig:
    """The config with `--backend` put in model.backend (validated like the YAML field)."""
    if backend is None:
        return config
    from pydantic import ValidationError

    from expertrag.model.backend import BACKENDS
    from expertrag.model.config import ModelConfig

    try:
        model = ModelConfig.model_validate({**config.model.model_dump(), "backend": backend})
    except ValidationError:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}, auto",
                         field="--backend") from None
    return config.model_copy(update={"model": model})


RAY_HELP = "run on Ray actors, each loading the model once (pip install -e '.[ray]'); same output as without it"
ADDRESS_HELP = "with --ray: a running cluster ('auto' or HOST:PORT); default: a local one for this run"
NUM_WORKERS_HELP = "with --ray: model actors (default 2)"


def check_ray_options(on_ray: bool, address: str | None, num_workers: int | None) -> None:
    """Usage checks of --ray/--address/--num-workers, before anything loads: Ray missing names the extra."""
    if not on_ray and (address is not None or num_workers is not None):
        raise InputError("--address and --num-workers need --ray")
    if on_ray:
        from expertrag.retrieval.ray_build import require_ray

        require_ray()
        if num_workers is not None and num_workers < 1:
            raise InputError(f"--num-workers must be at least 1, got {num_workers}")


def load_generator(config: ExpertRAGConfig) -> Any:
    from expertrag.pipeline.build import load_generator

    return load_generator(config)


def make_factory(index_dir: Path, config: ExpertRAGConfig, gate: Path | None, generator: Any = None):
    """policy name -> ExpertRAG sharing one Index and one generator (loaded now), caches off."""
    from expertrag.pipeline.build import policy_factory

    return policy_factory(index_dir, config, gate, generator if generator is not None else load_generator(config))


def provenance(config: ExpertRAGConfig, index: Path, gate: Path | None, labels: list[Path]) -> dict[str, Any]:
    from expertrag.fileio import sha256_file

    return {"index": str(index), "gate": str(gate) if gate else None,
            "labels": {str(p): sha256_file(p) for p in labels}, "expertrag": config.model_dump(mode="json")}


def print_policies(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    for col in ("policy", "n", "acc", "EM", "F1", "retrieval", "mean ms", "p95 ms", "p99 ms", "speed-up"):
        table.add_column(col, justify="left" if col == "policy" else "right")

    def f(v: Any, d: int = 3) -> str:
        return "–" if v is None else f"{v:.{d}f}" if isinstance(v, float) else str(v)

    s = result["summary"]
    for p, o in s["policies"].items():
        table.add_row(p, f(o["n"]), f(o["accuracy"]), f(o["em"]), f(o["f1"]), f(o["retrieval_rate"]),
                      f(o["latency_ms_mean"], 0), f(o["latency_ms_p95"], 0), f(o["latency_ms_p99"], 0),
                      f(o["speedup_vs_always"], 2))
    Console().print(table)
    for p, why in s["skipped"].items():
        print(f"skipped {p}: {why}")
    print(f"speed-up {s['adaptive_policy']} vs always: {f(s['speedup_adaptive_vs_always'], 2)} overall, "
          f"{f(s['speedup_no_retrieval_half'], 2)} on the no-retrieval half")


def write_eval(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    from expertrag.eval.report import write_report
    from expertrag.eval.results import write_json

    return write_json(result, out / "eval.json"), write_report(result, out)
