"""Corpus readers: JSONL, CSV/TSV, plain text and markdown files, and directories of them.

Everything streams: JSONL and CSV files are read and decoded one line at a time, so a 20 GB corpus
needs no more memory than its longest line, and (with `skip_bad=True`) one bad line costs one record,
not the file. A `.txt`/`.md` file is one document and is read whole.

Formats
- JSONL, one object a line: `{"id": str, "title": str?, "contents": str, "metadata": {...}?}`.
  * `text` is accepted as an alias of `contents` (BEIR/HF style corpora) when `contents` is absent.
  * FlashRAG corpora carry no `title` and start `contents` with a quoted title line
    (`"Title"\\nbody`): that line becomes the title and `contents` the body.
  * `id` may be a JSON integer (turned into its decimal string); a missing `id` defaults to
    `<file stem>:<line>`. Other top-level keys are ignored.
- CSV (`.csv`) / TSV (`.tsv`) with a header row: text column `ChunkingConfig.csv_text_column`
  (required), optional title and id columns (`csv_title_column`, `csv_id_column`); id defaults to
  `<file stem>:<row>` (1-based data row, blank rows not counted). Every other non-empty cell goes into
  metadata as a string; a `groups` column is split on `;` into a list.
- `.txt` / `.md` / `.markdown`: id = path relative to the root it was found under, without suffix, in
  POSIX form (`guides/install` for `docs/guides/install.md` when `docs` was given; the stem for a file
  given directly); title = first markdown heading (markdown files) or the file stem.
- Directories: walked recursively in sorted order (hidden entries skipped); the formats above are read,
  other files are listed in `IngestReport.ignored_files`.

`metadata.domain` must be a string and `metadata.groups` a list of strings (access groups). A passage
without groups is public. Because a typo there is a leak, a key that looks like an access key but is not
spelt `groups` (`"Groups"`, `"group"`) and a CSV groups cell that names no group (`" ; "`) give a warning
(in `IngestReport.warnings`), or an error with `strict=True`.

Every document is also checked for what the store and tokenizer cannot take (`validate_document`): ids
are non-empty strings without `#` (it separates a document id from the chunk number in passage ids, so
allowing it would let two passages share an id); text is valid Unicode (no lone surrogates such as
`"\ud800"`); metadata is JSON (string keys, finite numbers: no NaN/Infinity) nested at most
`MAX_METADATA_DEPTH` levels. JSON nested too deeply to parse is a bad line, like malformed JSON.

Errors are `InputError`s naming file, line and field. An unreadable file or directory is a data error
("cannot read ...: Permission denied"); a path that cannot be resolved says why (dangling symlink,
symlink loop). Argument errors (a path that does not exist, a
file given explicitly with an unsupported extension) always raise. Data errors (bad line, bad record,
empty file, duplicate id) raise too, unless `skip_bad=True`: then the record (or empty file) is skipped
and counted in the `IngestReport`. Ids must be unique across all files of one call; with `skip_bad` the
first occurrence wins.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertrag.data.config import ChunkingConfig
from expertrag.data.id_table import IdTable
from expertrag.data.types import Document
from expertrag.errors import InputError

TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown"})
MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})
JSONL_SUFFIXES = frozenset({".jsonl"})
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | JSONL_SUFFIXES | frozenset(CSV_DELIMITERS)

_BOM = b"\xef\xbb\xbf"
PathLike = str | os.PathLike[str]
ID_SEPARATOR = "#"  # passage id = f"{doc_id}#{chunk}" for documents of several passages
MAX_METADATA_DEPTH = 32
ACCESS_KEY = "groups"
_LINE_BITS = 40  # a duplicate-id location packs (file index << 40) | (line + 1) into one int64


@dataclass
class FileStats:
    documents: int = 0
    skipped: int = 0


@dataclass
class IngestReport:
    """What one ingestion run read and skipped. Filled as the document iterator is consumed."""

    documents_read: int = 0
    skipped: int = 0
    problems: list[tuple[str, int | None, str]] = field(default_factory=list)  # (path, line, reason)
    per_file: dict[str, FileStats] = field(default_factory=dict)
    ignored_files: list[str] = field(default_factory=list)  # directory entries of unsupported type
    warnings: list[tuple[str, int | None, str]] = field(default_factory=list)  # (path, line, message)
    warned: int = 0  # all warnings; `warnings` keeps the first `max_problems`
    max_problems: int = 100  # examples kept in `problems`; `skipped` counts them all

    def record_warning(self, err: InputError) -> None:
        self.warned += 1
        if len(self.warnings) < self.max_problems:
            reason = f"field '{err.field}': {err.reason}" if err.field else err.reason
            self.warnings.append((err.path or "?", err.line, reason))

    def file(self, path: str) -> FileStats:
        stats = self.per_file.get(path)
        if stats is None:
            stats = self.per_file[path] = FileStats()
        return stats

    def record_skip(self, err: InputError) -> None:
        self.skipped += 1
        path = err.path or "?"
        self.file(path).skipped += 1
        if len(self.problems) < self.max_problems:
            reason = f"field '{err.field}': {err.reason}" if err.field else err.reason
            self.problems.append((path, err.line, reason))

    def record_document(self, path: str) -> None:
        self.documents_read += 1
        self.file(path).documents += 1

    def summary(self) -> str:
        """Printable lines: paths and reasons (which quote user data) have their control characters escaped."""
        from expertrag.text import escape_controls as esc

        lines = [f"{self.documents_read} documents read from {len(self.per_file)} files, "
                 f"{self.skipped} skipped"]
        for path, line, reason in self.problems[:10]:
            lines.append(esc(f"  {path}{f':{line}' if line is not None else ''}: {reason}"))
        if self.skipped > 10:
            lines.append(f"  ... {self.skipped - min(10, len(self.problems))} more")
        if self.ignored_files:
            lines.append(f"  {len(self.ignored_files)} files of unsupported type ignored")
        for path, line, reason in self.warnings[:10]:
            lines.append(esc(f"  warning: {path}{f':{line}' if line is not None else ''}: {reason}"))
        if self.warned > 10:
            lines.append(f"  ... {self.warned - min(10, len(self.warnings))} more warnings")
        return "\n".join(lines)


class _Problems:
    """Raise or count: the one place that decides what a data error does."""

    def __init__(self, skip_bad: bool, report: IngestReport | None, strict: bool = False):
        self.skip_bad = skip_bad
        self.strict = strict
        self.report = report if report is not None else IngestReport()

    def __call__(self, err: InputError) -> None:
        if not self.skip_bad:
            raise err
        self.report.record_skip(err)

    def warn(self, err: InputError) -> None:
        """A likely mistake: an error under `strict`, else a warning in the report."""
        if self.strict:
            raise InputError(err.reason + " (refused under --strict)", path=err.path, line=err.line,
                             field=err.field)
        self.report.record_warning(err)


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> float:
    raise _NonFinite(name)


# --------------------------------------------------------------------------------------------- JSONL


def _utf8_error(raw: bytes, e: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)"


def iter_jsonl_objects(path: Path, problem: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file; bad lines go to `problem`."""
    seen_any = False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if not raw.strip():
                continue
            seen_any = True
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problem(InputError(_utf8_error(raw, e), path=path, line=lineno))
                continue
            try:
                obj = json.loads(text, parse_constant=_reject_constant)
            except json.JSONDecodeError as e:
                problem(InputError(f"malformed JSON: {e.msg} (column {e.colno})", path=path, line=lineno))
                continue
            except RecursionError:
                problem(InputError("JSON nested too deeply to read", path=path, line=lineno))
                continue
            except _NonFinite as e:
                problem(InputError(f"{e} is not valid JSON (strict parsers reject it); use null or a string",
                                   path=path, line=lineno))
                continue
            if not isinstance(obj, dict):
                problem(InputError(f"expected a JSON object, got {_json_type(obj)}", path=path, line=lineno))
                continue
            yield lineno, obj
    if not seen_any:
        problem(InputError("empty file: no records", path=path))


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def record_id(obj: dict[str, Any], path: Path, lineno: int) -> str:
    """The `id` of a JSON record: a non-empty string or an integer; `<stem>:<line>` when absent."""
    value = obj.get("id")
    if value is None:
        return f"{path.stem}:{lineno}"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise InputError(f"must be a string, got {_json_type(value)}", path=path, line=lineno, field="id")
    if not value.strip():
        raise InputError("is empty", path=path, line=lineno, field="id")
    return value


def record_metadata(obj: dict[str, Any], path: Path, lineno: int | None) -> dict[str, Any]:
    value = obj.get("metadata")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"must be an object, got {_json_type(value)}", path=path, line=lineno,
                         field="metadata")
    return validate_metadata(dict(value), path, lineno)


def _looks_like_access_key(key: str) -> bool:
    k = re.sub(r"[\s_\-]", "", key).casefold()
    return key != ACCESS_KEY and k in ("groups", "group", "accessgroups", "accessgroup", "grp", "grps")


def access_key_warnings(meta: dict[str, Any], path: Path | str, lineno: int | None) -> list[InputError]:
    """Keys that look like a misspelt `groups`: the passage would be public, maybe by mistake."""
    out = []
    for key in meta:
        if isinstance(key, str) and _looks_like_access_key(key):
            state = "public" if not meta.get(ACCESS_KEY) else f"visible to groups {meta.get(ACCESS_KEY)}"
            out.append(InputError(f"looks like the access key '{ACCESS_KEY}' but is spelt {key!r}; it is not "
                                  f"used for access control, so the passage is {state}", path=path,
                                  line=lineno, field=f"metadata.{key}"))
    return out


def validate_metadata(meta: dict[str, Any], path: Path | str | None, lineno: int | None) -> dict[str, Any]:
    """Check the keys retrieval understands: `domain` (str) and `groups` (list of str)."""
    domain = meta.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise InputError(f"must be a string, got {_json_type(domain)}", path=path, line=lineno,
                         field="metadata.domain")
    groups = meta.get("groups")
    if groups is not None:
        if not isinstance(groups, list):
            raise InputError(f"must be a list of strings, got {_json_type(groups)}", path=path, line=lineno,
                             field="metadata.groups")
        for g in groups:
            if not isinstance(g, str) or not g:
                raise InputError(f"must be a list of non-empty strings, found {json.dumps(g)}", path=path,
                                 line=lineno, field="metadata.groups")
    return meta


def split_flashrag_title(contents: str) -> tuple[str, str] | None:
    """FlashRAG's `"Title"\\nbody` convention → (title, body), or None when it does not apply."""
    if not contents.startswith('"'):
        return None
    nl = contents.find("\n")
    if nl < 0:
        return None
    first = contents[:nl].rstrip("\r")
    if len(first) < 2 or not first.endswith('"'):
        return None
    return first[1:-1], contents[nl + 1:]


def _document_from_json(obj: dict[str, Any], path: Path, lineno: int) -> Document:
    doc_id = record_id(obj, path, lineno)
    key = "contents" if "contents" in obj else "text" if "text" in obj else None
    if key is None:
        raise InputError("missing", path=path, line=lineno, field="contents")
    contents = obj[key]
    if not isinstance(contents, str):
        raise InputError(f"must be a string, got {_json_type(contents)}", path=path, line=lineno, field=key)
    title = obj.get("title")
    if title is None:
        title = ""
    elif not isinstance(title, str):
        raise InputError(f"must be a string, got {_json_type(title)}", path=path, line=lineno, field="title")
    if not title:
        split = split_flashrag_title(contents)
        if split is not None:
            title, contents = split
    if not contents.strip():
        raise InputError("is empty", path=path, line=lineno, field=key)
    meta = record_metadata(obj, path, lineno)
    return Document(id=doc_id, title=title, contents=contents, metadata=meta, source=str(path), line=lineno)


def _iter_jsonl(path: Path, problem: _Problems) -> Iterator[Document]:
    for lineno, obj in iter_jsonl_objects(path, problem):
        try:
            yield _document_from_json(obj, path, lineno)
        except InputError as err:
            problem(err)


# ----------------------------------------------------------------------------------------------- CSV


def _iter_csv(path: Path, cfg: ChunkingConfig, problem: _Problems) -> Iterator[Document]:
    bad_lines: dict[int, str] = {}

    def decoded_lines() -> Iterator[str]:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM):]
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad_lines[lineno] = _utf8_error(raw, e)
                    yield raw.decode("utf-8", errors="replace")

    reader = csv.reader(decoded_lines(), delimiter=CSV_DELIMITERS[path.suffix.lower()])
    try:
        header = next(reader)
        while not any(c.strip() for c in header):
            header = next(reader)
    except StopIteration:
        problem(InputError("empty file: no header row", path=path))
        return
    except csv.Error as e:
        problem(InputError(f"malformed CSV header: {e}", path=path, line=reader.line_num))
        return
    header_line = reader.line_num
    if header_line in bad_lines:
        problem(InputError(bad_lines[header_line], path=path, line=header_line))
        return
    header = [h.strip() for h in header]
    columns = {name: i for i, name in reversed(list(enumerate(header)))}
    text_col = cfg.csv_text_column
    if text_col not in columns:
        problem(InputError(f"text column '{text_col}' not in the header (columns: {', '.join(header)}); "
                           "set chunking.csv_text_column", path=path, line=header_line, field=text_col))
        return
    id_col = cfg.csv_id_column if cfg.csv_id_column in columns else None
    title_col = cfg.csv_title_column if cfg.csv_title_column in columns else None
    extra = [(name, i) for name, i in columns.items() if name and name not in (text_col, id_col, title_col)]

    prev_end = header_line
    row_no = 0
    seen_rows = False
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            problem(InputError(f"malformed CSV: {e}", path=path, line=reader.line_num))
            if reader.line_num == prev_end:
                break
            prev_end = reader.line_num
            continue
        start, prev_end = prev_end + 1, reader.line_num
        if not any(c.strip() for c in row):
            continue
        seen_rows = True
        row_no += 1
        bad = next((ln for ln in range(start, prev_end + 1) if ln in bad_lines), None)
        try:
            if bad is not None:
                raise InputError(bad_lines[bad], path=path, line=bad)
            if len(row) != len(header):
                raise InputError(f"row has {len(row)} fields, the header has {len(header)}", path=path,
                                 line=start)
            text = row[columns[text_col]]
            if not text.strip():
                raise InputError("is empty", path=path, line=start, field=text_col)
            if id_col is not None:
                doc_id = row[columns[id_col]].strip()
                if not doc_id:
                    raise InputError("is empty", path=path, line=start, field=id_col)
            else:
                doc_id = f"{path.stem}:{row_no}"
            title = row[columns[title_col]].strip() if title_col is not None else ""
            meta: dict[str, Any] = {}
            for name, i in extra:
                cell = row[i].strip()
                if cell:
                    meta[name] = [g.strip() for g in cell.split(";") if g.strip()] if name == "groups" else cell
                    if name == "groups" and not meta[name]:
                        problem.warn(InputError(f"cell {cell!r} names no group, so the passage is public",
                                                path=path, line=start, field="groups"))
            yield Document(id=doc_id, title=title, contents=text, metadata=meta, source=str(path), line=start)
        except InputError as err:
            problem(err)
    if not seen_rows:
        problem(InputError("empty file: a header but no rows", path=path))


# ------------------------------------------------------------------------------------- text/markdown

_ATX = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_SETEXT_H1 = re.compile(r"^ {0,3}=+[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def markdown_title(text: str) -> str | None:
    """The first ATX (`# Title`) or setext (`Title\\n=====`) heading outside code fences."""
    in_fence = False
    prev = ""
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            prev = ""
            continue
        if in_fence:
            continue
        m = _ATX.match(line)
        if m and m.group(1).strip():
            return m.group(1).strip()
        if prev.strip() and _SETEXT_H1.match(line):
            return prev.strip()
        prev = line
    return None


def _read_text_file(path: Path, doc_id: str, problem: _Problems) -> Iterator[Document]:
    try:
        data = path.read_bytes()  # one file is one document: it is held whole anyway
    except OSError as e:
        problem(InputError(f"cannot read file: {e.strerror or e}", path=path))
        return
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    if not data:
        problem(InputError("empty file", path=path))
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line_end = data.find(b"\n", e.start)
        raw = data[line_start:line_end if line_end >= 0 else len(data)]
        err = UnicodeDecodeError(e.encoding, e.object, e.start - line_start, e.end - line_start, e.reason)
        problem(InputError(_utf8_error(raw, err), path=path, line=data.count(b"\n", 0, e.start) + 1))
        return
    if not text.strip():
        problem(InputError("has no text (only whitespace)", path=path))
        return
    title = markdown_title(text) if path.suffix.lower() in MARKDOWN_SUFFIXES else None
    yield Document(id=doc_id, title=title or path.stem, contents=text, metadata={}, source=str(path))


# ----------------------------------------------------------------------------------------- dispatch


def _iter_file(path: Path, doc_id: str, cfg: ChunkingConfig, problem: _Problems) -> Iterator[Document]:
    suffix = path.suffix.lower()
    try:
        if suffix in JSONL_SUFFIXES:
            yield from _iter_jsonl(path, problem)
        elif suffix in CSV_DELIMITERS:
            yield from _iter_csv(path, cfg, problem)
        else:
            yield from _read_text_file(path, doc_id, problem)
    except OSError as e:  # unreadable (permissions), or an I/O error part-way
        problem(InputError(f"cannot read file: {e.strerror or e}", path=path))


def path_problem(p: Path) -> str | None:
    """Why `p` cannot be used as an input path, in words, or None when it resolves."""
    try:
        os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            return f"dangling symlink (points to {os.readlink(p)!r}, which does not exist)"
        return "no such file or directory"
    except OSError as e:
        import errno

        if e.errno == errno.ELOOP:
            return "symlink loop (too many levels of symbolic links)"
        return f"cannot access: {e.strerror or e}"
    return None


def _walk(root: Path, problem: _Problems) -> Iterator[Path]:
    """Entries under `root`, depth first in name order (= sorted by relative path parts); hidden entries
    skipped; an unreadable directory is a data error; symlinked directories are followed once."""
    seen: set[tuple[int, int]] = set()

    def visit(d: Path) -> Iterator[Path]:
        try:
            st = d.stat()
            key = (st.st_dev, st.st_ino)
            if key in seen:
                return
            seen.add(key)
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            problem(InputError(f"cannot read directory: {e.strerror or e}", path=d))
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            p = Path(e.path)
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                yield from visit(p)
            else:
                yield p

    yield from visit(root)


def _expand(root: Path, report: IngestReport, problem: _Problems) -> Iterator[tuple[Path, str]]:
    """(file, id for whole-file documents) for a root given by the user."""
    if root.is_file():
        yield root, root.stem
        return
    found = False
    for p in _walk(root, problem):
        rel = p.relative_to(root)
        if not p.is_file():
            continue
        if p.suffix.lower() not in SUPPORTED_SUFFIXES:
            report.ignored_files.append(str(p))
            continue
        found = True
        yield p, rel.with_suffix("").as_posix()
    if not found and os.access(root, os.R_OK | os.X_OK):
        problem(InputError(f"directory holds no corpus files ({', '.join(sorted(SUPPORTED_SUFFIXES))})",
                           path=root))


def _as_paths(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    if isinstance(paths, str | os.PathLike):
        return [Path(paths)]
    return [Path(p) for p in paths]


def check_paths(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """The given inputs as Paths, after checking each exists and (for files) has a supported type."""
    out = _as_paths(paths)
    if not out:
        raise InputError("no input paths given")
    for p in out:
        why = path_problem(p)
        if why is not None:
            raise InputError(why, path=p)
        if p.is_file() and p.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise InputError(f"unsupported file type '{p.suffix or '(none)'}' (supported: "
                             f"{', '.join(sorted(SUPPORTED_SUFFIXES))})", path=p)
        if not p.is_file() and not p.is_dir():
            raise InputError("not a regular file or directory", path=p)
    return out


def iter_documents(
    paths: PathLike | Iterable[PathLike],
    *,
    config: ChunkingConfig | None = None,
    skip_bad: bool = False,
    report: IngestReport | None = None,
    strict: bool = False,
) -> Iterator[Document]:
    """Stream the documents of the given files/directories, in order; see the module doc for formats.

    All paths are checked before the first document is produced. `report` (if given) is filled as the
    iterator is consumed. strict: likely mistakes (a misspelt access key) are errors, not warnings.
    """
    cfg = config if config is not None else ChunkingConfig()
    roots = check_paths(paths)
    problem = _Problems(skip_bad, report, strict)
    rep = problem.report
    files: list[str] = []
    # every id read so far with where it was first seen (file index << _LINE_BITS | line + 1; 0 = no line), in
    # ~50-100 bytes an id instead of a dict's ~200 (data/id_table.py)
    seen = IdTable()
    for root in roots:
        for path, whole_file_id in _expand(root, rep, problem):
            files.append(str(path))
            file_index = len(files) - 1
            rep.file(str(path))
            for doc in _iter_file(path, whole_file_id, cfg, problem):
                try:
                    validate_document(doc)
                    for w in access_key_warnings(doc.metadata, path, doc.line):
                        problem.warn(w)
                except InputError as err:
                    problem(err)
                    continue
                first = seen.add(doc.id, (file_index << _LINE_BITS) | (doc.line + 1 if doc.line is not None else 0))
                if first is not None:
                    first_line = first & ((1 << _LINE_BITS) - 1)
                    where = files[first >> _LINE_BITS] + (f":{first_line - 1}" if first_line else "")
                    problem(InputError(f"duplicate id '{doc.id}' (first seen at {where})", path=path,
                                       line=doc.line, field="id"))
                    continue
                rep.record_document(str(path))
                yield doc


# ---------------------------------------------------------------------------------------- validation


def _bad_unicode(text: str) -> str | None:
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"holds a lone surrogate U+{ord(text[e.start]):04X} at character {e.start + 1} (not valid Unicode)"
    return None


def _check_json_value(value: Any, where: str) -> tuple[str, str] | None:
    """(field path, problem) of the first thing in `value` that is not storable JSON, else None.
    Iterative, so a deep structure cannot exhaust the stack."""
    stack: list[tuple[Any, str, int]] = [(value, where, 1)]
    while stack:
        v, at, depth = stack.pop()
        if depth > MAX_METADATA_DEPTH:
            return at, f"nested more than {MAX_METADATA_DEPTH} levels deep"
        if isinstance(v, str):
            bad = _bad_unicode(v)
            if bad:
                return at, bad
        elif isinstance(v, bool) or v is None or isinstance(v, int):
            continue
        elif isinstance(v, float):
            if not math.isfinite(v):
                return at, f"{v} is not valid JSON (NaN/Infinity); use null or a string"
        elif isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    return at, f"has a key of type {type(k).__name__}; keys must be strings"
                bad = _bad_unicode(k)
                if bad:
                    return at, f"a key {bad}"
                stack.append((item, f"{at}.{k}", depth + 1))
        elif isinstance(v, list | tuple):
            for i, item in enumerate(v):
                stack.append((item, f"{at}[{i}]", depth + 1))
        else:
            return at, f"holds a {type(v).__name__}, which is not JSON"
    return None


def validate_document(doc: Document) -> Document:
    """Raise InputError (naming source, line and field) for what the store or tokenizer cannot take."""
    where = dict(path=doc.source or None, line=doc.line)
    if not isinstance(doc.id, str) or not doc.id.strip():
        raise InputError("must be a non-empty string", field="id", **where)
    if ID_SEPARATOR in doc.id:
        raise InputError(f"{doc.id!r} contains '{ID_SEPARATOR}', which separates a document id from its chunk "
                         "number in passage ids; rename the document", field="id", **where)
    for name in ("id", "title", "contents"):
        value = getattr(doc, name)
        if not isinstance(value, str):
            raise InputError(f"must be a string, got {type(value).__name__}", field=name, **where)
        bad = _bad_unicode(value)
        if bad:
            raise InputError(bad, field=name, **where)
    if not doc.contents.strip():
        raise InputError("is empty", field="contents", **where)
    if not isinstance(doc.metadata, dict):
        raise InputError(f"must be an object, got {type(doc.metadata).__name__}", field="metadata", **where)
    found = _check_json_value(doc.metadata, "metadata")
    if found is not None:
        raise InputError(found[1], field=found[0], **where)
    validate_metadata(doc.metadata, doc.source or None, doc.line)
    return doc


def document_from_record(obj: dict[str, Any], where: str, number: int) -> Document:
    """One JSONL-style record `{id, title?, contents, metadata?}` as a Document, validated exactly as a
    corpus file's line is (`where`/`number` locate it in errors: a file and line, or a request and index)."""
    return _document_from_json(obj, Path(where), number)
