"""`expertrag merge-results`: pool results over disjoint question sets and recompute every aggregate."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from expertrag.cli import eval_common as ec
from expertrag.cli.app import app
from expertrag.errors import InputError


@app.command("merge-results")
def merge_results_cmd(
    files: list[Path] = typer.Argument(..., help="eval.json (from `eval` / `bench pipeline --out`) or gates.json "
                                                 "(from `eval-gates`) files over disjoint questions"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the merged JSON and report"),
    as_json: bool = typer.Option(False, "--json", help="print the merged summary as JSON on the last line"),
) -> None:
    """Pool results over disjoint question sets (cross-fitted folds, each judged by the gate trained on the
    others) and recompute every aggregate from the pooled per-question records."""
    from expertrag.eval.gate_eval import GATES_FORMAT, merge_gate_results, write_gate_report
    from expertrag.eval.merge import merge_results
    from expertrag.eval.results import FORMAT, write_json

    parts = []
    for f in files:
        ec.check_file(f, "result file")
        try:
            parts.append(json.loads(f.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"not a JSON result file: {e}", path=f) from None
        fmt = parts[-1].get("format") if isinstance(parts[-1], dict) else None
        if fmt not in (FORMAT, GATES_FORMAT):
            raise InputError(f"unknown result format {fmt!r} (want {FORMAT} or {GATES_FORMAT})", path=f)
    formats = {p["format"] for p in parts}
    if len(formats) > 1:
        raise InputError("cannot merge eval.json with gates.json results")
    try:
        if formats == {GATES_FORMAT}:
            merged = merge_gate_results(parts)
            json_path, report_path = write_json(merged, out / "gates.json"), write_gate_report(merged, out)
            summary = {"n": merged["n"], "baselines": merged["baselines"],
                       "policies": {p: r["overall"] | {"sweep_best": (r.get("sweep") or {}).get("best")}
                                    for p, r in merged["results"].items()}}
        else:
            merged = merge_results(parts)
            json_path, report_path = ec.write_eval(merged, out)
            summary = merged["summary"]
    except ValueError as e:
        raise InputError(str(e)) from None
    if as_json:
        print(json.dumps(summary | {"json": str(json_path), "report": str(report_path)}, default=str))
    else:
        print(f"merged {len(parts)} results -> {json_path} and {report_path}")
