"""The package's parts import downward only (DESIGN.md, "Layers"), function-local imports included.

data/store <- retrieval <- moe/model <- gate <- pipeline <- eval/bench/serve <- config <- cli, with the
standard-library-only leaves (errors, fileio, paths, answers, classification, text, peak_rss) below everything. Parts on one
layer may import each other, but no two parts may import each other in a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import expertrag

ROOT = Path(expertrag.__file__).parent

LAYERS: list[set[str]] = [
    {"errors", "fileio", "paths", "answers", "classification", "text", "peak_rss"},
    {"data", "store"},
    {"retrieval"},
    {"moe", "model"},
    {"gate", "experts"},  # experts (domain routing, policy expert) sit beside the gate
    {"pipeline"},
    {"eval", "bench", "serve"},  # serve reads the sections it needs, never the root config
    {"config"},  # composes every part's config section, so only the top layer may import it
    {"cli", "__main__"},
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}


def part_of(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    return rel[0][:-3] if len(rel) == 1 else rel[0]


def import_edges() -> dict[tuple[str, str], list[str]]:
    """(importer part, imported part) -> the files where it happens."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in ROOT.rglob("*.py"):
        src = part_of(path)
        if src == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                bits = name.split(".")
                if bits[0] == "expertrag" and len(bits) > 1 and bits[1] != src:
                    edges.setdefault((src, bits[1]), []).append(str(path.relative_to(ROOT)))
    return edges


def test_every_part_has_a_layer():
    parts = {part_of(p) for p in ROOT.rglob("*.py")} - {"__init__"}
    assert parts <= set(RANK), f"parts without a layer in this test and DESIGN.md: {sorted(parts - set(RANK))}"


def test_imports_point_down_only():
    upward = [f"{a} -> {b} ({', '.join(sorted(set(files)))})" for (a, b), files in sorted(import_edges().items())
              if RANK.get(b, -1) > RANK.get(a, len(LAYERS))]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_cycles_within_a_layer():
    edges = import_edges()
    both = sorted({tuple(sorted(e)) for e in edges if (e[1], e[0]) in edges})
    assert not both, f"parts importing each other: {both}"


def test_the_checker_sees_function_local_imports():
    # The check is only worth something if it sees the imports that hide inside functions.
    edges = import_edges()
    assert ("cli", "pipeline") in edges and ("pipeline", "retrieval") in edges
    local = [f for f in edges[("cli", "pipeline")] if f.startswith("cli/")]
    assert local
