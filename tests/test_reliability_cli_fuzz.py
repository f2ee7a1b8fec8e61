"""CLI fuzz (issue 10): random argument vectors for every command never produce a traceback.

Each argv runs in-process through the console entry point `expertrag.cli.main`; an exception that
escapes it is what a user would have seen as a traceback. A run must end with exit 0 (it did something
valid), 1 (a command's own "not found" result) or 2 (a one-line `error: ...`). Values are drawn from a
pool of hostile ones: non-numbers, floats, negatives, empty strings, control characters, an undecodable
byte (surrogate-escaped, as Python presents it), paths that do not exist, a plain file, an empty folder,
a file of garbage, a deeply nested JSON line, a broken index. Commands that would do expensive valid work
with no required option (demo, bench, train lm) always get an unknown option too, so only their parsing
is fuzzed. EXPERTRAG_LONG_TESTS=1 runs 10x more.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reliability_helpers import _PROGRESS, LONG, cli

COMMANDS = {
    "index": ["--corpus", "-c", "--out", "-o", "--config", "--skip-bad", "--strict", "--json"],
    "delete": ["--index", "-i", "--config"],
    "search": ["--index", "-i", "-k", "--mode", "-m", "--queries", "--domain", "--group", "--all-groups",
               "--config", "--json"],
    "ask": ["--index", "-i", "--policy", "-p", "--gate", "--group", "--all-groups", "--config", "--json"],
    "recall": ["--index", "-i", "--dataset", "-d", "--k", "--modes", "--limit", "--config", "--json"],
    "label": ["--dataset", "-d", "--index", "-i", "--out", "-o", "--limit", "--from-metadata", "--batch-size",
              "--config"],
    "split-labels": ["--labels", "-l", "--out", "-o", "--folds", "--splits", "--prefix", "--seed", "--questions",
                     "-q"],
    "eval-gates": ["--index", "-i", "--labels", "-l", "--out", "-o", "--policies", "-p", "--gate", "--limit",
                   "--config", "--bootstrap", "--time-answers", "--json"],
    "train gate": ["--labels", "-l", "--index", "-i", "--out", "-o", "--objective", "--no-probe", "--limit",
                   "--config", "--reuse-traces", "--no-reuse-traces", "--json"],
}
PARSE_ONLY = {  # valid-looking argv would start real work: always add an unknown option
    "demo": ["--out", "--limit", "--policy", "--retrain-gate", "--config"],
    "bench retrieval": ["--data", "--limit", "--queries", "--json"],
    "bench moe": ["--tokens", "--repeats", "--json"],
    "train lm": ["--data", "-d", "--index", "-i", "--config", "--steps", "--out", "-o", "--resume", "--json"],
    "no-such-command": ["--x"],
}
REQUIRED = {  # the required options (and arguments) of each command, so that many argvs get past parsing
    "index": ["--corpus", "--out"], "delete": ["--index", "ID"], "search": ["--index", "QUERY"],
    "ask": ["--index", "QUERY"], "recall": ["--index", "--dataset"], "label": ["--dataset", "--index", "--out"],
    "split-labels": ["--labels", "--out"], "eval-gates": ["--index", "--labels", "--out"],
    "train gate": ["--labels", "--index"],
}
WITH_VALID = {"index", "delete", "search", "recall"}  # cheap with a real index; the rest would load the LM
EXAMPLES = 2000 if LONG else 300
COUNTS = {"runs": 0, "exit0": 0, "exit1": 0, "exit2": 0}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    (d / "empty").mkdir()
    (d / "plain.txt").write_text("just text\n")
    (d / "garbage.jsonl").write_bytes(b'{"id": 1, "contents": \xff\xfe}\n[1,2]\n"str"\n')
    (d / "deep.jsonl").write_text('{"id": "a", "contents": ' + "[" * 50_000 + "]" * 50_000 + "}\n")
    (d / "sur.jsonl").write_text('{"id": "a\\ud800", "question": "q\\udfff", "contents": "x"}\n')
    (d / "bad.yaml").write_text("retrieval: [unclosed\n")
    broken = d / "broken-index"
    broken.mkdir()
    (broken / "manifest.json").write_text(json.dumps({"format_version": 1, "files": None}))
    (d / "loop").symlink_to(d / "loop")
    pool = [str(p) for p in (d / "empty", d / "plain.txt", d / "garbage.jsonl", d / "deep.jsonl",
                             d / "sur.jsonl", d / "bad.yaml", broken, d / "loop", d / "missing.jsonl")]
    from expertrag.data.types import Document
    from expertrag.retrieval import build_index

    good = d / "good-index"
    build_index(good, [Document(f"g{i}", f"T{i}", f"Kelp forests and tides, note {i}.",
                                {"groups": ["hr"]} if i % 2 else {}) for i in range(6)], progress=False)
    corpus = d / "good.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"c{i}", "contents": f"Comets {i}", "question": f"what {i}?",
                                          "golden_answers": ["x"]}) + "\n" for i in range(3)))
    valid = [str(good), str(corpus), str(d / "new-index")]
    cwd = d / "cwd"  # relative paths the fuzz makes up ("abc", "", "0") land here, not in the repo
    cwd.mkdir()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        yield pool, valid
    finally:
        os.chdir(old)


VALUES = ["abc", "1.5", "-1", "0", "3", "", " ", "hybrid", "fuzzy", "a\nb", "\x1b[2J", "\udcff", "h#0",
          "--", "-", "NaN", "1e999", "9" * 30, "ünïcødé", "=", "--json"]


def argv_for(command: str, options: list[str], pool: list[str], parse_only: bool, valid: list[str]):
    value = st.one_of(st.sampled_from(VALUES), st.sampled_from(pool), st.text(max_size=6))
    required_value = st.one_of(st.sampled_from(valid), value) if valid else value
    token = st.one_of(st.sampled_from(options), value, st.sampled_from(["--help-me", "-z", "--index=", "-k="]))
    body = st.lists(token, max_size=8)
    short = st.lists(token, max_size=2)
    if parse_only:
        return st.tuples(body, st.integers(0, 8)).map(
            lambda t: command.split() + t[0][:t[1]] + ["--zz-unknown-fuzz-option"] + t[0][t[1]:])
    required = REQUIRED.get(command, [])
    skeleton = st.tuples(*[required_value.map(lambda v, r=r: [r, v] if r.startswith("-") else [v]) for r in required])
    with_skeleton = st.tuples(skeleton, short).map(lambda t: [x for pair in t[0] for x in pair] + t[1])
    return st.one_of(body, with_skeleton, with_skeleton).map(lambda b: command.split() + b)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_argv_never_gives_a_traceback(paths, data):
    pool, valid = paths
    names = sorted(COMMANDS) + sorted(PARSE_ONLY)
    command = data.draw(st.sampled_from(names), label="command")
    parse_only = command in PARSE_ONLY
    options = PARSE_ONLY[command] if parse_only else COMMANDS[command]
    usable = valid if command in WITH_VALID else []
    argv = data.draw(argv_for(command, options, pool + usable, parse_only, usable), label="argv")
    if "--help" in argv or "-h" in argv:
        return
    code, out, err = cli(*argv)  # an escaping exception fails the test with its traceback
    COUNTS["runs"] += 1
    COUNTS[f"exit{code}"] = COUNTS.get(f"exit{code}", 0) + 1
    assert "Traceback" not in err
    assert code in (0, 1, 2), (argv, code, err)
    if os.environ.get("EXPERTRAG_FUZZ_LOG"):
        with open(os.environ["EXPERTRAG_FUZZ_LOG"], "a") as f:
            f.write(json.dumps([argv, code, err.strip().splitlines()[-1:] if err.strip() else []]) + "\n")
    if code == 2 and not err.lstrip().startswith("Usage"):  # a bare group prints its help
        lines = [ln for ln in err.strip().splitlines() if not _PROGRESS.search(ln)]
        errors = [ln for ln in lines if ln.startswith("error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], (argv, err)
        assert "\x1b" not in errors[0] and "\udcff" not in errors[0]


def test_fuzz_case_count():
    print(f"CLI fuzz: {COUNTS}")
    if COUNTS["runs"] == 0:
        pytest.skip("the fuzz test did not run in this session (run the whole file)")
    assert COUNTS["runs"] >= EXAMPLES * 0.9 and COUNTS["exit2"] > 0
