"""`label --ray` and `eval --ray` (issue 17): model actors give the single-process run's output.

The real SmolLM2 and MiniLM run in the driver (the reference) and in every actor; the index is five short
documents and the questions five, so a Ray run is a few model loads and a few dozen short generations.
A local Ray cluster (num_cpus=2, loopback) is started by the module fixture and shut down after it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from expertrag.data.types import Document, Question
from expertrag.retrieval.ray_build import INSTALL_HINT, ray_available

pytestmark = pytest.mark.slow
needs_ray = pytest.mark.skipif(not ray_available(), reason=f"Ray is not installed ({INSTALL_HINT})")

DOCS = [
    Document("paris", "Paris", "Paris is the capital and largest city of France, on the Seine."),
    Document("zorbl", "Zorblatt Institute", "The Zorblatt Institute was founded in 1987 by Mirela Quenton in Tallinn."),
    Document("moon", "Moon", "The Moon is Earth's only natural satellite; it causes the tides."),
    Document("tea", "Tea", "Tea is an aromatic beverage prepared by pouring hot water over cured tea leaves."),
    Document("nile", "Nile", "The Nile is a major river in northeastern Africa that flows into the Mediterranean."),
]
QUESTIONS = [
    Question("q1", "What is the capital of France?", ["Paris"]),
    Question("q2", "Who founded the Zorblatt Institute?", ["Mirela Quenton"]),
    Question("q3", "What causes the tides?", ["Moon"]),
    Question("q4", "How is tea prepared?", ["hot water"]),
    Question("q5", "Into which sea does the Nile flow?", ["Mediterranean"]),
]
CONFIG = {"pipeline": {"k": 2, "max_new_tokens": 8, "probe_tokens": 4}, "eval": {"warmup": 1}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_dir):
    if not ray_available():
        pytest.skip(f"Ray is not installed ({INSTALL_HINT})")
    import ray

    from expertrag.config import ExpertRAGConfig
    from expertrag.retrieval.builder import build_index

    tmp = tmp_path_factory.mktemp("raywork")
    build_index(tmp / "idx", DOCS, progress=False)
    config = ExpertRAGConfig.model_validate(CONFIG)
    # the actors inherit the driver's environment: one torch thread each, offline model loading
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", ignore_reinit_error=True,
             log_to_driver=False)
    try:
        yield tmp, config
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def single_labels(setup):
    """The reference: `label_questions` in this process, batches of 2."""
    from expertrag.pipeline.build import load_pipeline
    from expertrag.pipeline.labeling import label_questions

    tmp, config = setup
    out = tmp / "single.jsonl"
    label_questions(load_pipeline(tmp / "idx", config, "always"), QUESTIONS, out, batch_size=2, progress=False)
    return out.read_text(encoding="utf-8")


@needs_ray
def test_label_on_ray_writes_the_single_process_file_and_resumes(setup, single_labels):
    from expertrag.pipeline.ray_work import label_on_ray

    tmp, config = setup
    out = tmp / "ray.jsonl"
    counts = label_on_ray(tmp / "idx", config, QUESTIONS, out, batch_size=2, num_workers=2, progress=False)
    assert out.read_text(encoding="utf-8") == single_labels  # same records, same order, byte for byte
    assert sum(counts.values()) == 5
    # a run killed after the first batch, mid-line: the rerun skips the two ids on file and redoes the torn one
    lines = single_labels.splitlines(keepends=True)
    resumed = tmp / "resumed.jsonl"
    resumed.write_text("".join(lines[:2]) + lines[2][:20], encoding="utf-8")
    counts = label_on_ray(tmp / "idx", config, QUESTIONS, resumed, batch_size=2, num_workers=1, progress=False)
    assert sum(counts.values()) == 3
    assert resumed.read_text(encoding="utf-8") == single_labels  # the torn text is cut off, not glued to
    # nothing left to do: no cluster work, no change
    assert label_on_ray(tmp / "idx", config, QUESTIONS, resumed, batch_size=2, num_workers=1) == {}


class CrashOnce:
    """Mixed into the label worker by the test below: the first time it is given q3 the worker process
    exits hard (as a killed or OOM worker does); the marker file makes the crash happen once only."""

    marker: str

    def label(self, questions):
        if any(q.id == "q3" for q in questions) and os.path.exists(self.marker):
            os.remove(self.marker)
            os._exit(1)
        return super().label(questions)


@needs_ray
def test_a_worker_that_dies_is_restarted_and_its_batch_retried(setup, single_labels):
    import ray.cloudpickle

    from expertrag.pipeline.ray_work import LabelWorker, label_on_ray

    tmp, config = setup
    marker = tmp / "crash-once"
    marker.write_text("")
    # the subclass travels by value: the worker processes cannot import this test module
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    worker = type("CrashingLabelWorker", (CrashOnce, LabelWorker), {"marker": str(marker)})
    out = tmp / "crashed.jsonl"
    label_on_ray(tmp / "idx", config, QUESTIONS, out, batch_size=2, num_workers=1, progress=False, worker=worker)
    assert not marker.exists()  # it did crash on q3's batch ...
    assert out.read_text(encoding="utf-8") == single_labels  # ... and the file is whole, each batch once


class FailsToStart:
    def __init__(self, *args):
        from expertrag.errors import InputError

        raise InputError("model folder not found", path="/nowhere")

    def label(self, questions):  # never reached
        return []


@needs_ray
def test_a_worker_that_cannot_start_is_one_clear_error(setup):
    import ray.cloudpickle

    from expertrag.errors import ExpertRAGError
    from expertrag.pipeline.ray_work import label_on_ray

    tmp, config = setup
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with pytest.raises(ExpertRAGError, match="could not start: .*/nowhere: model folder not found$"):
        label_on_ray(tmp / "idx", config, QUESTIONS, tmp / "never.jsonl", num_workers=1, worker=FailsToStart)
    assert not (tmp / "never.jsonl").read_text()  # nothing written (the file is opened before the first batch)


@needs_ray
def test_eval_on_ray_gives_the_single_process_answers(setup):
    from expertrag.cli import eval_common as ec
    from expertrag.eval.ray_run import evaluate_on_ray
    from expertrag.eval.runner import evaluate

    tmp, config = setup
    args = dict(k_sweep=[1], progress=False)
    single = evaluate(ec.make_factory(tmp / "idx", config, None), QUESTIONS, ["never", "always", "adaptive"],
                      settings=config.eval, **args)
    on_ray = evaluate_on_ray(tmp / "idx", config, None, QUESTIONS, ["never", "always", "adaptive"],
                             eval_settings=config.eval, num_workers=2, **args)

    def strip(records):  # everything but the timings, which are each process's own
        return [{k: v for k, v in r.items() if not k.endswith("_ms")} for r in records]

    assert len(single["records"]) == 3 * 5  # never, always, always@k=1; adaptive has no gate artifacts
    assert strip(on_ray["records"]) == strip(single["records"])
    assert on_ray["skipped"].keys() == single["skipped"].keys() == {"adaptive"}
    for p in ("never", "always"):
        a, b = single["results"][p]["overall"], on_ray["results"][p]["overall"]
        assert (a["n"], a["accuracy"], a["retrieval_rate"]) == (b["n"], b["accuracy"], b["retrieval_rate"])
    assert on_ray["context_dilution"]["1"]["accuracy"] == single["context_dilution"]["1"]["accuracy"]


@needs_ray
def test_label_and_eval_commands_on_ray(setup, single_labels):
    # the command in this process: it finds the fixture's Ray session and uses it as is
    from typer.testing import CliRunner

    from expertrag.cli.app import app

    tmp, _ = setup
    cfg = tmp / "c.yaml"
    cfg.write_text(json.dumps(CONFIG))  # JSON is YAML
    qfile = tmp / "q.jsonl"
    qfile.write_text("".join(json.dumps({"id": q.id, "question": q.question, "golden_answers": q.golden_answers})
                             + "\n" for q in QUESTIONS[:2]))
    out = tmp / "cli.jsonl"
    r = CliRunner().invoke(app, ["label", "--ray", "--num-workers", "1", "-d", str(qfile), "-i", str(tmp / "idx"),
                                 "-o", str(out), "--batch-size", "2", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert out.read_text(encoding="utf-8") == "".join(single_labels.splitlines(keepends=True)[:2])
    # the provenance sidecar the Ray run wrote is the one a run without --ray computes: it resumes the file
    assert (tmp / "cli.provenance.json").exists()
    r = CliRunner().invoke(app, ["label", "-d", str(qfile), "-i", str(tmp / "idx"), "-o", str(out),
                                 "--batch-size", "2", "--config", str(cfg)])
    assert r.exit_code == 0 and "labelled 0 questions" in r.output, r.output
    r = CliRunner().invoke(app, ["eval", "--ray", "--num-workers", "1", "-d", str(qfile), "-i", str(tmp / "idx"),
                                 "-o", str(tmp / "eval"), "--policies", "never", "--k-sweep", "none",
                                 "--config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp / "eval" / "eval.json").read_text())
    assert [(x["policy"], x["id"]) for x in result["records"]] == [("never", "q1"), ("never", "q2")]
    assert result["datasets"]["q"]["sha256"] and (tmp / "eval" / "report.md").exists()


def _run(args: list[str], hide_ray: bool = False) -> subprocess.CompletedProcess:
    code = ("import sys; " + ("sys.modules['ray'] = None; " if hide_ray else "") +
            f"from expertrag.cli import main; sys.argv = ['expertrag', *{args!r}]; main()")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["label", "eval"])
def test_ray_usage_errors_are_one_line(tmp_path, command):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"id": "1", "question": "What is tea?", "golden_answers": ["tea"]}) + "\n")
    (tmp_path / "idx").mkdir()
    base = [command, "-d", str(q), "-i", str(tmp_path / "idx"), "-o", str(tmp_path / "out")]
    cases = [(["--ray"], True, INSTALL_HINT),
             (["--num-workers", "2"], False, "error: --address and --num-workers need --ray")]
    if ray_available():
        cases.append((["--ray", "--num-workers", "0"], False, "error: --num-workers must be at least 1, got 0"))
    for extra, hide, message in cases:
        proc = _run(base + extra, hide_ray=hide)
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        assert proc.returncode != 0 and len(lines) == 1 and message in lines[0], (extra, proc.stderr)
    assert not (tmp_path / "out").exists()
