"""`expertrag eval`: every retrieval policy end to end on question files, JSON + Markdown report.

The generator and the index are loaded once and one `ExpertRAG` is built per policy around them, with the
answer and retrieval caches off (policies must not share answers). A policy whose gate artifacts are
missing is reported as skipped with the reason; the others run.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from expertrag.cli import eval_common as ec
from expertrag.cli.app import app
from expertrag.config import ExpertRAGConfig
from expertrag.errors import InputError


@app.command("eval")
def eval_cmd(
    index: Path = typer.Option(..., "--index", "-i", help="index directory"),
    dataset: list[Path] = typer.Option(..., "--dataset", "-d", help="question file with gold answers (repeatable)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: eval.json, report.md and figures"),
    policies: str | None = typer.Option(None, "--policies", "-p",
                                        help="comma-separated policies, or 'all' (default: eval.policies)"),
    labels: list[Path] | None = typer.Option(None, "--labels", help="label file from `expertrag label` (repeatable)"),
    gate: Path | None = typer.Option(None, "--gate", help="gate artifacts folder (default: INDEX/gate)"),
    limit: int | None = typer.Option(None, "--limit", help="questions per dataset, sampled by --seed"),
    seed: int | None = typer.Option(None, "--seed", help="sampling seed (default: eval.seed)"),
    k_sweep: str | None = typer.Option(None, "--k-sweep", help="context dilution k values, e.g. 1,3,5,10,20; 'none' skips"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON on the last line"),
    backend: str | None = typer.Option(None, "--backend", help=ec.BACKEND_HELP),
    on_ray: bool = typer.Option(False, "--ray", help=ec.RAY_HELP),
    address: str | None = typer.Option(None, "--address", help=ec.ADDRESS_HELP),
    num_workers: int | None = typer.Option(None, "--num-workers", help=ec.NUM_WORKERS_HELP),
) -> None:
    """Evaluate retrieval policies end to end: accuracy, latency, gate quality, threshold sweep, dilution."""
    from expertrag.data.questions import load_questions
    from expertrag.eval.runner import evaluate

    ec.check_ray_options(on_ray, address, num_workers)
    config = ec.with_backend(ExpertRAGConfig.load(config_path), backend)
    settings = config.eval
    names = ec.parse_policies(policies, settings.policies)
    ks = ec.parse_ks(k_sweep, settings.k_sweep)
    if limit is not None and limit <= 0:
        raise InputError("--limit must be positive")
    ec.check_index(index)
    files: dict[str, Path] = {}
    for p in dataset:
        ec.check_file(p, "question file")
        name = p.stem if p.stem not in files else f"{p.stem}-{len(files)}"
        files[name] = p
    questions = {name: load_questions(p) for name, p in files.items()}
    label_paths = list(labels or [])
    label_map = ec.read_label_files(label_paths)
    common = dict(labels=label_map, limit=limit if limit is not None else settings.limit,
                  seed=settings.seed if seed is None else seed, progress=None if not as_json else False,
                  k_sweep=ks, files=files, config=ec.provenance(config, index, gate, label_paths))
    if on_ray:
        from expertrag.eval.ray_run import evaluate_on_ray

        result = evaluate_on_ray(index, config, gate, questions, names, eval_settings=settings,
                                 num_workers=num_workers or 2, address=address, **common)
    else:
        result = evaluate(ec.make_factory(index, config, gate), questions, names, settings=settings, **common)
    json_path, report_path = ec.write_eval(result, out)
    if as_json:
        print(json.dumps(result["summary"] | {"eval_json": str(json_path), "report": str(report_path)}))
    else:
        ec.print_policies(result)
        print(f"wrote {json_path} and {report_path}")
