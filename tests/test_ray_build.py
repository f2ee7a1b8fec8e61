"""`expertrag index --ray`: the Ray Data build gives the single-process build's index (issue 17).

A local Ray cluster (num_cpus=2, loopback) is started by the module fixture and shut down after it.
The real MiniLM embedder runs in both builds; the corpus is a few dozen wiki passages, some long enough
to be cut into several chunks so that chunk order across actors is exercised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from expertrag.data.readers import iter_documents
from expertrag.retrieval.builder import build_index
from expertrag.retrieval.index import Index
from expertrag.retrieval.ray_build import INSTALL_HINT, ray_available

needs_ray = pytest.mark.skipif(not ray_available(), reason=f"Ray is not installed ({INSTALL_HINT})")


def _corpus(path: Path) -> Path:
    """30 short documents plus 3 long ones made of several joined, so chunking cuts them."""
    from expertrag.data.wiki_offline import iter_wiki_offline_documents  # the packaged corpus

    rows = [{"id": d.id, "title": d.title, "contents": d.contents, "metadata": d.metadata}
            for d in iter_wiki_offline_documents(limit=60)]
    docs = rows[:30]
    for k in range(3):
        part = rows[30 + 10 * k:40 + 10 * k]
        docs.append({"id": f"long{k}", "title": f"Long {k}",
                     "contents": "\n\n".join(r["contents"] for r in part), "metadata": {"domain": "long"}})
    path.write_text("".join(json.dumps(r) + "\n" for r in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ray_cluster():
    if not ray_available():
        pytest.skip(f"Ray is not installed ({INSTALL_HINT})")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", ignore_reinit_error=True,
             log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def builds(tmp_path_factory, ray_cluster):
    from expertrag.retrieval.ray_build import build_index_on_ray

    tmp = tmp_path_factory.mktemp("raybuild")
    corpus = _corpus(tmp / "corpus.jsonl")
    single = build_index(tmp / "single", iter_documents([corpus]), progress=False)
    on_ray = build_index_on_ray(tmp / "ray", iter_documents([corpus]), progress=False, num_workers=2)
    return tmp, corpus, single, on_ray


@needs_ray
def test_ray_build_gives_the_same_index(builds):
    tmp, _, single, on_ray = builds
    assert on_ray.passages == single.passages > 33  # the long documents were cut into several passages
    assert on_ray.embedded == single.embedded == single.passages
    a, b = Index(tmp / "single"), Index(tmp / "ray")
    # ids in row order (the FAISS row order), and the stored texts with them
    assert a.store.live_ids(a.generation) == b.store.live_ids(b.generation)
    texts = [[r[1:] for batch in i.store.iter_live_texts(i.generation) for r in batch] for i in (a, b)]
    assert texts[0] == texts[1]
    # same manifest apart from times and the (content-addressed, so equal) checksums
    ma = json.loads((tmp / "single" / "manifest.json").read_text())
    mb = json.loads((tmp / "ray" / "manifest.json").read_text())
    for m in (ma, mb):
        m.pop("created_at"), m.pop("updated_at")
    fa, fb = ma.pop("files"), mb.pop("files")
    assert ma == mb and fa.keys() == fb.keys()
    # BM25 files are byte-identical; FAISS bytes may differ by float rounding, so vectors are compared below
    assert {k: v for k, v in fa.items() if k.startswith("bm25")} == {k: v for k, v in fb.items()
                                                                       if k.startswith("bm25")}
    # the vectors FAISS was built from (the store's, in row order); torch in a 1-thread actor and in this
    # process may differ in float rounding only
    def vectors(i: Index) -> np.ndarray:
        m = i.manifest
        return np.concatenate([v for _, v in i.store.iter_live_vectors(i.generation, m.embedder, m.embedding_dim)])

    va, vb = vectors(a), vectors(b)
    assert va.shape == vb.shape == (single.passages, 384) and len(a.dense) == len(b.dense) == single.passages
    np.testing.assert_allclose(va, vb, atol=1e-5)
    for q in ("what is the additive identity", "a long river in Africa", "Long 2", "number zero"):
        for mode in ("bm25", "dense", "hybrid"):
            ha, hb = a.search(q, 10, mode), b.search(q, 10, mode)
            assert [h.id for h in ha] == [h.id for h in hb], (q, mode)
            np.testing.assert_allclose([h.score for h in ha], [h.score for h in hb], rtol=1e-4, atol=1e-5)


@needs_ray
def test_ray_update_embeds_only_new_text(builds, ray_cluster):
    from expertrag.retrieval.ray_build import build_index_on_ray

    tmp, corpus, _, _ = builds
    extra = tmp / "extra.jsonl"
    extra.write_text(json.dumps({"id": "new1", "title": "Kelp", "contents": "Kelp forests grow in cold seas."})
                     + "\n", encoding="utf-8")
    again = build_index_on_ray(tmp / "ray", iter_documents([corpus, extra]), progress=False, num_workers=2)
    assert again.generation == 2 and again.embedded == 1 and again.counts["added"] == 1
    assert [h.id for h in Index(tmp / "ray").search("kelp forests", 1, "dense")] == ["new1"]


class FailOnce:
    """Mixed into the embed worker by the resume test: logs every text it embeds (JSON lines in `log`), and
    while the `marker` file exists raises on the shard holding a passage of the document titled "Long 2"
    (the corpus's last), as a worker whose shard fails does; removing the marker makes it fail once only."""

    marker: str
    log: str

    def encode(self, texts):
        if os.path.exists(self.marker) and any(t.startswith("Long 2. ") for t in texts):
            os.remove(self.marker)
            raise RuntimeError("injected shard failure")
        vectors = super().encode(texts)
        with open(self.log, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(t) + "\n" for t in texts))
        return vectors


def _logged(path: Path) -> list[str]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


@needs_ray
def test_ray_build_interrupted_half_way_resumes_without_redoing_finished_shards(builds, tmp_path, monkeypatch):
    import ray.cloudpickle

    from expertrag.errors import ExpertRAGError
    from expertrag.retrieval import builder
    from expertrag.retrieval.ray_build import EncodeWorker, build_index_on_ray
    from expertrag.store.docstore import DocStore

    tmp, corpus, single, _ = builds
    monkeypatch.setattr(builder, "EMBED_COMMIT_ROWS", 8)  # shards of 8 texts: several in a tiny corpus
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this module
    marker = tmp_path / "fail-once"
    marker.write_text("")
    out = tmp_path / "idx"

    def worker(log: str) -> type:
        return type("LoggingEncodeWorker", (FailOnce, EncodeWorker), {"marker": str(marker), "log": log})

    # 1 worker: shards run in order, so every shard before the failing one has come back and been committed
    with pytest.raises(ExpertRAGError, match=r"embedding shard (\d+) failed on a Ray worker \(.*injected shard "
                                             r"failure\); the \1 shards before it are saved: run the same command"):
        build_index_on_ray(out, iter_documents([corpus]), progress=False, num_workers=1,
                           encode_worker=worker(str(tmp_path / "run1.jsonl")))
    assert not marker.exists() and not (out / "manifest.json").exists()  # it failed, nothing was committed
    store = DocStore(out / "store.sqlite")
    saved = dict(store.conn.execute("SELECT content_hash, vector FROM embeddings").fetchall())
    saved_texts = {f"{t}. {c}" for t, c in store.conn.execute(
        "SELECT title, contents FROM passages WHERE content_hash IN (SELECT content_hash FROM embeddings)")}
    store.close()
    assert 0 < len(saved) < single.passages and len(saved) % 8 == 0  # whole shards, not all of them

    resumed = build_index_on_ray(out, iter_documents([corpus]), progress=False, num_workers=1,
                                 encode_worker=worker(str(tmp_path / "run2.jsonl")))
    sent = _logged(tmp_path / "run2.jsonl")
    # only the shards that were not committed went to the workers; the saved ones were reused as they were
    assert resumed.embedded == len(sent) == single.passages - len(saved)
    assert not saved_texts & set(sent)
    a, b = Index(tmp / "single"), Index(out)
    assert all(b.store.conn.execute("SELECT vector FROM embeddings WHERE content_hash = ?", (h,)).fetchone()[0] == v
               for h, v in saved.items())
    # and the index is the single-process build's
    assert a.store.live_ids(a.generation) == b.store.live_ids(b.generation)
    m = a.manifest
    va, vb = (np.concatenate([v for _, v in i.store.iter_live_vectors(i.generation, m.embedder, m.embedding_dim)])
              for i in (a, b))
    np.testing.assert_allclose(va, vb, atol=1e-5)
    for q in ("what is the additive identity", "Long 2"):
        for mode in ("bm25", "dense", "hybrid"):
            assert [h.id for h in a.search(q, 10, mode)] == [h.id for h in b.search(q, 10, mode)], (q, mode)


KILLED_DRIVER = """
import os, signal, sys
from pathlib import Path
from expertrag.data.readers import iter_documents
from expertrag.retrieval import builder
from expertrag.retrieval.ray_build import build_index_on_ray
from expertrag.store.docstore import DocStore

builder.EMBED_COMMIT_ROWS = 8
real, calls = DocStore.put_embeddings, []
def put_then_die(self, *a, **k):
    real(self, *a, **k)
    calls.append(1)
    if len(calls) == 2:  # the driver dies right after committing its second shard
        os.kill(os.getpid(), signal.SIGKILL)
DocStore.put_embeddings = put_then_die
build_index_on_ray(sys.argv[2], iter_documents([Path(sys.argv[1])]), progress=False, num_workers=1)
"""


@needs_ray
def test_a_killed_driver_resumes_without_redoing_committed_shards(builds, tmp_path, monkeypatch):
    """SIGKILL of the driver itself (its own local Ray cluster goes with it), not a failing worker: the rerun
    embeds only the shards that were not committed and gives the single-process index."""
    from expertrag.retrieval import builder
    from expertrag.retrieval.ray_build import build_index_on_ray
    from expertrag.store.docstore import DocStore

    tmp, corpus, single, _ = builds
    out = tmp_path / "idx"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local cluster, not ours
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", KILLED_DRIVER, str(corpus), str(out)], env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / "manifest.json").exists()  # nothing was committed as an index
    store = DocStore(out / "store.sqlite")
    saved = store.conn.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
    store.close()
    assert saved == 16  # the two committed shards of 8, no more, no less

    monkeypatch.setattr(builder, "EMBED_COMMIT_ROWS", 8)
    resumed = build_index_on_ray(out, iter_documents([corpus]), progress=False, num_workers=1)
    assert resumed.embedded == single.passages - saved
    a, b = Index(tmp / "single"), Index(out)
    assert a.store.live_ids(a.generation) == b.store.live_ids(b.generation)
    for q in ("what is the additive identity", "Long 2"):
        for mode in ("bm25", "dense", "hybrid"):
            assert [h.id for h in a.search(q, 10, mode)] == [h.id for h in b.search(q, 10, mode)], (q, mode)


class _Who:
    """A worker that says which actor ran each job."""

    def job(self, job):
        import ray

        return job, ray.get_runtime_context().get_actor_id()


@needs_ray
def test_every_worker_gets_a_job_before_any_gets_a_second(ray_cluster):
    # a 1,042-passage build has 3 shards (512, 512, 18): with the first two queued on one actor, 2 workers
    # were no faster than 1 (bench ray, quiet box)
    import ray.cloudpickle

    from expertrag.retrieval.ray_build import ordered_results, start_workers

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module
    actors = start_workers(_Who, 2, 1)
    try:
        out = list(ordered_results(actors, "job", range(3)))
    finally:
        for a in actors:
            ray_cluster.kill(a)
    assert [job for job, _ in out] == [0, 1, 2]  # in job order, whichever finished first
    owners = [actor for _, actor in out]
    assert owners[0] != owners[1] and owners[2] == owners[0]


def test_ray_flag_without_ray_is_one_clear_error(tmp_path):
    # Ray hidden from the import system: what a user without the extra sees
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "a", "contents": "alpha"}) + "\n", encoding="utf-8")
    code = ("import sys; sys.modules['ray'] = None; from expertrag.cli import main; "
            f"sys.argv = ['expertrag', 'index', '--ray', '-c', {str(corpus)!r}, '-o', {str(tmp_path / 'i')!r}]; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and INSTALL_HINT in lines[0], proc.stderr
    assert not (tmp_path / "i").exists()


@pytest.mark.parametrize("args, message", [
    (["--address", "auto"], "--address and --num-workers need --ray"),
    (["--num-workers", "2"], "--address and --num-workers need --ray"),
])
def test_ray_options_without_ray_flag_are_refused(tmp_path, args, message):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "a", "contents": "alpha"}) + "\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "expertrag", "index", "-c", str(corpus), "-o", str(tmp_path / "i"),
                           *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {message}", proc.stderr
    assert not (tmp_path / "i").exists()


@needs_ray
def test_ray_num_workers_must_be_positive(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "a", "contents": "alpha"}) + "\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "expertrag", "index", "--ray", "--num-workers", "0", "-c",
                           str(corpus), "-o", str(tmp_path / "i")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --num-workers must be at least 1, got 0"
    assert not (tmp_path / "i").exists()


@needs_ray
def test_index_command_with_ray_flag(tmp_path):
    # the command end to end: its own local cluster (1 worker), started and stopped by the command
    corpus = tmp_path / "c.jsonl"
    rows = [{"id": "a", "title": "Aurora", "contents": "An aurora is a natural light display in polar skies."},
            {"id": "b", "title": "Tide", "contents": "Tides are the rise and fall of sea levels caused by the Moon."}]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "expertrag", "index", "--ray", "--num-workers", "1", "--json",
                           "-c", str(corpus), "-o", str(tmp_path / "i")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["passages"] == 2 and report["embedded"] == 2
    assert [h.id for h in Index(tmp_path / "i").search("sea levels and the Moon", 1, "dense")] == ["b"]


@needs_ray
def test_bench_ray_runs_every_build_on_the_same_slice(tmp_path):
    # a tiny slice: this checks that the three fresh-process builds run and are reported consistently,
    # not the speed (RESULTS.md has the measured run)
    from expertrag.bench.ray_index import run

    # the packaged corpus (tests never read the shared data); 2 demo questions labelled 3 ways, batches of 1
    result = run(data=None, passages=8, progress=False, questions=2, batch_size=1)
    assert result["documents"] == 8 and result["passages"] >= 8
    assert result["label_questions"] == 2 and result["label_files_identical"]  # run() raises if they differ
    for w in (1, 2):
        assert result[f"label_ray{w}_q_per_min"] == pytest.approx(120 / result[f"label_ray{w}_s"])
    assert result["label_single_q_per_min"] > result["label_single_with_load_q_per_min"] > 0
    for w in (1, 2):
        assert result[f"ray{w}_s"] > 0 and result[f"ray{w}_cluster_start_s"] > 0
        assert result[f"ray{w}_time_vs_single"] == pytest.approx(result[f"ray{w}_s"] / result["single_s"])
        # the driver of a Ray build never loads the embedder, so it stays below the single-process driver
        assert result[f"ray{w}_driver_peak_rss_mb"] < result["single_driver_peak_rss_mb"]
        # every embedding worker reports its own peak (it loaded the embedder: well above an empty process);
        # no more workers start than there are shards (this slice is one shard)
        assert 1 <= len(result[f"ray{w}_worker_peak_rss_mb"]) <= w
        assert all(mb > 100 for mb in result[f"ray{w}_worker_peak_rss_mb"])
