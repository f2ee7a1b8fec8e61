"""One markdown table of the gate-ablation rows evaluated on a split: the adaptive gate of each row (AUROC
of known (no_retrieve) against the rest, with its bootstrap 95% interval; AUROC on the decisive questions,
retrieve against no_retrieve; accuracy at its decisions, retrieval rate, the retrieval share at which it
matches always-retrieve, curve gain over the random chord, gate cost), then the baselines of the first row.

    python scripts/gate_ablation_table.py results/gate_ablation dev
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cell(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def ci(v) -> str:
    return f" [{v[0]:.3f}, {v[1]:.3f}]" if v else ""


def row(name: str, o: dict) -> str:
    g, op, cost = o.get("gate_quality") or {}, o.get("operating") or {}, o.get("cost") or {}
    share = cost.get("gate_share_of_answer_time")
    dec = o.get("gate_quality_decisive") or {}
    return (f"| {name} | {op.get('n', o['n'])} | {cell(g.get('auroc'))}{ci(o.get('auroc_ci'))} | "
            f"{cell(dec.get('auroc'))} (n={dec.get('n', '–')}) | "
            f"{cell(op.get('accuracy_at_decisions', o.get('accuracy')))}{ci(op.get('accuracy_ci'))} | "
            f"{cell(o.get('retrieval_rate'))} | {cell(op.get('match_rate'))}{ci(op.get('match_rate_ci'))} | "
            f"{cell(op.get('curve_gain'), 4)}{ci(op.get('curve_gain_ci'))} | {cell(cost.get('gate_ms'), 1)} | "
            f"{'–' if share is None else f'{share:.1%}'} |")


def main(out: str, split: str) -> None:
    docs = {p.parent.parent.name: json.loads(p.read_text()) for p in sorted(Path(out).glob(f"*/{split}/gates.json"))}
    if not docs:
        sys.exit(f"no {out}/*/{split}/gates.json: run scripts/gate_ablation.sh ROW {split} first")
    header = ("| {} | n | AUROC known [95% CI] | AUROC decisive | acc [95% CI] | retrieval | match always [95% CI] "
              "| curve gain [95% CI] | gate ms | gate share |\n|---|---|---|---|---|---|---|---|---|---|")
    print(header.format("row (adaptive)"))
    for name, d in docs.items():
        if "adaptive" in d["results"]:
            print(row(name, d["results"]["adaptive"]["overall"]))
        else:
            print(f"| {name} | skipped: {d.get('skipped', {}).get('adaptive', '?')} |")
    base_row = max(docs, key=lambda k: len(docs[k]["results"]))  # the row run with POLICIES=all, if any
    first = docs[base_row]
    b = first["baselines"]
    print(f"\nBaselines (row {base_row}): never {b['never_accuracy']:.3f}, always {b['always_accuracy']:.3f}, "
          f"oracle {b['oracle_accuracy']:.3f}\n")
    print(header.format("baseline policy"))
    for p, r in first["results"].items():
        if p != "adaptive":
            print(row(p, r["overall"]))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
