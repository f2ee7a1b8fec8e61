"""Merge label files made in parallel over one pool (e.g. one run from the pool's start, one from its end)
into one file in pool order. Refuses files whose provenance sidecars record other settings, or an id labelled
twice with different labels; the first file's sidecar is kept, with every file's datasets.

--allow-index-rebuild: also merge files whose settings differ only in the index build (its `created_at` and
the dense file's hash: the same corpora, chunking, embedder and backend, rebuilt on another machine, where
ONNX Runtime's int8 kernels can round differently). The sidecar then lists every build with the files and the
label count made on it (`index_builds`), and `--note` says how the builds were checked against each other.

    python scripts/merge_labels.py --pool results/labels/shared_questions.jsonl \
        --out results/labels/shared_all.jsonl results/labels/shared_all.jsonl part2.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def sidecar(p: Path) -> Path:
    return p.with_suffix(".provenance.json")


def without_build(settings: dict) -> dict:
    """The settings without what differs between two builds of the same index."""
    index = {k: v for k, v in settings["index"].items() if k not in ("created_at", "dense")}
    return dict(settings, index=index)


def index_builds(paths: list[Path], provs: list[dict], counts: dict[Path, int]) -> list[dict]:
    builds: dict[tuple, dict] = {}
    for p, prov in zip(paths, provs, strict=True):
        index = prov["settings"]["index"]
        b = builds.setdefault((index.get("dense"), index.get("created_at")),
                              {"dense": index.get("dense"), "created_at": index.get("created_at"),
                               "machine": prov.get("machine"), "files": [], "labels_kept": 0})
        b["files"].append(str(p))
        b["labels_kept"] += counts[p]
    return list(builds.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=Path, required=True, help="the question file the labels came from")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--allow-index-rebuild", action="store_true",
                    help="merge files whose settings differ only in the index build (created_at, dense hash)")
    ap.add_argument("--note", default=None, help="with --allow-index-rebuild: how the builds were compared")
    ap.add_argument("labels", type=Path, nargs="+")
    args = ap.parse_args()
    provs = [json.loads(sidecar(p).read_text()) for p in args.labels]
    rebuilt = len({p["settings_sha256"] for p in provs}) != 1  # settings differ: only an index rebuild may
    if rebuilt:
        if not args.allow_index_rebuild:
            sys.exit("the label files were made with different settings (settings_sha256 differ): not merged")
        if len({json.dumps(without_build(p["settings"]), sort_keys=True) for p in provs}) != 1:
            sys.exit("the label files differ in more than the index build (created_at, dense hash): not merged")
    records: dict[str, dict] = {}
    kept: dict[Path, int] = dict.fromkeys(args.labels, 0)
    for p in args.labels:
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line of a stopped run: that question is simply not labelled
                old = records.get(r["id"])
                if old is not None and old["label"] != r["label"]:
                    sys.exit(f"{p}:{n}: id {r['id']} is labelled {r['label']!r} here and {old['label']!r} before")
                if old is None:
                    records[r["id"]] = r
                    kept[p] += 1
    order = [json.loads(line)["id"] for line in open(args.pool, encoding="utf-8")]
    known = set(order)
    stray = [i for i in records if i not in known]
    if stray:
        sys.exit(f"{len(stray)} labelled ids are not in the pool (e.g. {stray[0]}): not merged")
    lines = [json.dumps(records[i], ensure_ascii=False) for i in order if i in records]
    tmp = args.out.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prov = dict(provs[0])
    prov["datasets"] = sorted({d for p in provs for d in p.get("datasets", [])})
    prov["merged_from"] = [str(p) for p in args.labels]
    if rebuilt:
        prov["index_builds"] = index_builds(args.labels, provs, kept)
        if args.note:
            prov["index_builds_note"] = args.note
    sidecar(args.out).with_suffix(".json.tmp").write_text(json.dumps(prov, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(args.out)
    sidecar(args.out).with_suffix(".json.tmp").replace(sidecar(args.out))
    print(f"{len(lines)} labels -> {args.out}")


if __name__ == "__main__":
    main()
