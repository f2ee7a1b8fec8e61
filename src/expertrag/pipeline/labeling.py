"""Deriving gate labels from the model itself: answer closed-book and open-book, compare with the gold.

`retrieve` where only the open-book answer is right, `no_retrieve` where the closed-book one is (retrieval
cannot help, and may hurt: SKR's ir_worse), `both_wrong` otherwise. Correctness is PopQA-style: a gold
answer contained in the normalised prediction. Results are appended batch by batch and a rerun skips ids
already labelled, so a long labelling run can be stopped and resumed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from expertrag.answers import contains_answer
from expertrag.data.types import Question
from expertrag.gate.labels import LabelRecord, derive_label
from expertrag.gate.types import Probe
from expertrag.model.backend import generate_all
from expertrag.model.prompts import closed_book_messages, open_book_messages
from expertrag.pipeline.rag import ExpertRAG, PipelineGateContext


def already_labelled(path: Path) -> set[str]:
    if not path.exists():
        return set()
    done = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                done.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError):
                continue  # a torn last line from a killed run: that question is redone
    return done


def trace(g) -> dict[str, list]:
    """A generation's per-token record for the label file (5 decimals: far below the gate's resolution)."""
    return {"token_ids": [int(t) for t in g.token_ids],
            "logprobs": [round(float(x), 5) for x in g.logprobs],
            "entropies": [round(float(x), 5) for x in g.entropies]}


def open_for_append(out: Path):
    """`out` opened for appending label records. A torn last line (a run killed mid-write) is cut off first:
    the next record would otherwise be glued to it and lost with it, and its question redone on every rerun."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file() and out.stat().st_size:
        with open(out, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    return open(out, "a", encoding="utf-8")


def label_batch(rag: ExpertRAG, questions: Sequence[Question]) -> list[LabelRecord]:
    """One batch's label records, in the order of `questions` (each with gold answers): both books are
    generated for the whole batch at once. `label_questions` and the Ray workers (pipeline/ray_work.py)
    both call this, so a batch gives the same records wherever it runs."""
    cfg = rag.config
    hits = [PipelineGateContext(rag, q.question, dict(q.metadata), None).retrieve(cfg.k) for q in questions]
    closed = generate_all(rag.generator, [closed_book_messages(q.question) for q in questions],
                          max_new_tokens=cfg.max_new_tokens, stop=cfg.stop)
    opened = generate_all(
        rag.generator, [open_book_messages(q.question, h, cfg.passage_max_chars) for q, h in zip(questions, hits, strict=True)],
        max_new_tokens=cfg.max_new_tokens, stop=cfg.stop)
    records = []
    for q, c, o in zip(questions, closed, opened, strict=True):
        closed_ok = bool(contains_answer(c.text, q.golden_answers))
        open_ok = bool(contains_answer(o.text, q.golden_answers))
        records.append(LabelRecord(id=q.id, question=q.question, label=derive_label(closed_ok, open_ok),
                                   closed_correct=closed_ok, open_correct=open_ok, closed_answer=c.text,
                                   open_answer=o.text, metadata=dict(q.metadata), closed_trace=trace(c)))
    return records


def labelling_todo(questions: Sequence[Question], out: Path) -> list[Question]:
    """The questions still to label into `out`: those with gold answers whose id is not in it yet."""
    done = already_labelled(out)
    return [q for q in questions if q.golden_answers and q.id not in done]


def label_questions(rag: ExpertRAG, questions: Sequence[Question], out: Path, *, batch_size: int = 8,
                    progress: bool | None = None) -> dict[str, int]:
    """Label `questions` (those with gold answers) into the JSONL file `out`; returns label counts."""
    todo = labelling_todo(questions, out)
    counts: dict[str, int] = {}
    bar = tqdm(total=len(todo), desc="label", unit="q", disable=None if progress is None else not progress)
    with open_for_append(out) as f:
        for i in range(0, len(todo), batch_size):
            part = todo[i:i + batch_size]
            for record in label_batch(rag, part):
                counts[record.label] = counts.get(record.label, 0) + 1
                f.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(part))
    bar.close()
    return counts


def trace_probe(record: LabelRecord, probe_tokens: int, label_max_new_tokens: int, decode=None) -> Probe | None:
    """The gate's probe read off a label's closed-book trace, or None when the trace cannot stand for it.

    The probe is the closed-book prompt decoded greedily for `probe_tokens` tokens with the same stop
    strings as the labelled answer, so its tokens (and their log-probs and entropies) are the answer's first
    `probe_tokens`: usable when the trace has at least that many, or is shorter than the labelling run's
    max_new_tokens (the answer ended, by eos or a stop string, where the probe would end too). The caller
    checks that the settings match (`trace_reuse`). No hidden state or router statistics: a gate that reads
    them needs a real probe. Labels were generated in batches (left padding): equal to a lone probe up to
    float rounding, as `answer_many` is to `answer`."""
    tr = record.closed_trace
    if tr is None:
        return None
    n = len(tr["token_ids"])
    if n < probe_tokens and n >= label_max_new_tokens:
        return None
    ids = tr["token_ids"][:probe_tokens]
    if n <= probe_tokens:
        text = record.closed_answer or ""
    elif decode is not None:
        text = decode(ids)
    else:
        return None
    return Probe(text=text, token_ids=list(ids), logprobs=list(tr["logprobs"][:probe_tokens]),
                 entropies=list(tr["entropies"][:probe_tokens]))


def trace_reuse(rag: ExpertRAG, model: dict, provenance: Mapping[str, Any] | None) -> tuple[int | None, str]:
    """(the labelling run's max_new_tokens, "") when the label file's traces may stand for this pipeline's
    probes, else (None, why not). They may when the provenance sidecar records the same model set-up,
    closed-book prompt, stop strings and greedy decoding as this pipeline, and the model gives no router
    statistics (traces do not carry them). No sidecar: nothing is known, so the probes are recomputed."""
    if provenance is None:
        return None, "the labels have no provenance sidecar"
    prev = provenance.get("settings") or {}
    cur = label_settings(rag, model)
    diff = [k for k in ("model", "stop", "decoding") if prev.get(k) != cur.get(k)]
    if (prev.get("prompts") or {}).get("closed_book") != cur["prompts"]["closed_book"]:
        diff.append("prompts.closed_book")
    if diff:
        return None, f"the labels were made with other settings ({', '.join(diff)} differ)"
    if rag.generator.capabilities.router_stats:
        return None, "the model has MoE router statistics, which label traces do not carry"
    mnt = prev.get("max_new_tokens")
    if not isinstance(mnt, int):
        return None, "the provenance records no max_new_tokens"
    return mnt, ""


def gate_examples(rag: ExpertRAG, records: Sequence[LabelRecord], *, probe: bool = True,
                  progress: bool | None = None, gate: Any = None, trace_max_new_tokens: int | None = None,
                  stats: dict | None = None) -> list:
    """Features of each labelled question, computed as at answer time (same context, same probe).

    Batched: embeddings and rankings per 64 questions (`PipelineGateContext.many`), probes per
    pipeline.probe_batch_size (`ExpertRAG.probe_many`). With `trace_max_new_tokens` (from `trace_reuse`)
    a label's closed-book trace stands for its probe where `trace_probe` allows and no hidden state is
    needed (gate.use_hidden). `gate` (GateConfig): which features to compute (hidden states, N sampled
    drafts). `stats` receives the counts and seconds of each step."""
    from expertrag.gate.features import probe_features, sample_features
    from expertrag.gate.train import GateExample

    use_hidden = True if gate is None else bool(gate.use_hidden)  # no config: everything, as before
    n_samples = 0 if gate is None else int(gate.sample_consistency)
    st = stats if stats is not None else {}
    st.update(questions=len(records), probes_from_traces=0, probes_run=0)
    disable = None if progress is None else not progress
    t0 = time.perf_counter()
    ctxs = PipelineGateContext.many(rag, [(r.question, dict(r.metadata)) for r in records])
    feats = [c.query_features() for c in tqdm(ctxs, desc="query features", unit="q", disable=disable)]
    st["query_s"] = time.perf_counter() - t0
    probes: list[Probe | None] = [None] * len(records)
    sample_feats: dict[int, dict[str, float]] = {}
    if probe:
        t1 = time.perf_counter()
        decode = _decoder(rag.generator)
        if trace_max_new_tokens is not None and not use_hidden:
            for i, r in enumerate(records):
                probes[i] = trace_probe(r, rag.config.probe_tokens, trace_max_new_tokens, decode)
        st["probes_from_traces"] = sum(p is not None for p in probes)
        todo = [i for i, p in enumerate(probes) if p is None]
        bar = tqdm(total=len(todo), desc="probes", unit="q", disable=disable)
        step = rag.config.probe_batch_size
        for j in range(0, len(todo), step):
            part = todo[j:j + step]
            for i, p in zip(part, rag.probe_many([records[i].question for i in part], hidden=use_hidden),
                            strict=True):
                probes[i] = p
            bar.update(len(part))
        bar.close()
        st["probes_run"] = len(todo)
        st["probe_s"] = time.perf_counter() - t1
        if n_samples:
            t2 = time.perf_counter()
            # one question per batch of n, the layout of answer time, so a training question's samples are
            # exactly those it gets when answered (packing several questions per batch measured no faster:
            # 2.9 s/question against 2.2 s alone, RESULTS.md issue 14)
            step = 1
            bar = tqdm(total=len(records), desc="samples", unit="q", disable=disable)
            for j in range(0, len(records), step):
                idx = list(range(j, min(j + step, len(records))))
                drafts = rag.sample_drafts([records[i].question for i in idx], n_samples, gate.sample_temperature,
                                           gate.sample_seed, batch_rows=step * n_samples)
                for i, texts in zip(idx, drafts, strict=True):
                    sample_feats[i] = sample_features(probes[i].text, texts)  # against the greedy draft
                bar.update(len(idx))
            bar.close()
            st["samples_s"] = time.perf_counter() - t2
    examples = []
    for i, (r, c) in enumerate(zip(records, ctxs, strict=True)):
        p = probes[i]
        pf = None if p is None else {**probe_features(p), **sample_feats.get(i, {})}
        examples.append(GateExample(
            id=r.id, label=r.label, query_features=feats[i], probe_features=pf,
            query_embedding=c.query_embedding(), hidden=p.hidden if p is not None else None,
            metadata=dict(r.metadata), closed_correct=r.closed_correct, open_correct=r.open_correct,
        ))
    st["total_s"] = time.perf_counter() - t0
    st["s_per_question"] = st["total_s"] / max(len(records), 1)
    return examples


def _decoder(generator: Any):
    """Token ids -> text as the generator would return it (special tokens dropped), or None."""
    tok = getattr(generator, "tokenizer", None)
    if tok is None or not hasattr(tok, "decode"):
        return None
    return lambda ids: tok.decode(list(ids), skip_special_tokens=True)


def label_settings(rag: ExpertRAG, model: dict) -> dict:
    """What decides a label (model set-up, index, prompts, decoding): recorded beside every label file so
    labels made with other settings are never mixed into it by a resumed run."""
    cfg, m = rag.config, rag.index.manifest
    return {
        "model": model,
        "index": {"dir": str(rag.index.dir), "generation": m.generation, "passages": m.passages,
                  "embedder": m.embedder, "embed_backend": m.extra.get("embed_backend", "torch"),
                  "created_at": m.created_at, "dense": m.files.get(m.dense_file)},
        "prompts": {"closed_book": closed_book_messages("{question}"),
                    "open_book": open_book_messages("{question}", [], cfg.passage_max_chars)},
        "k": cfg.k, "search_mode": cfg.search_mode, "passage_max_chars": cfg.passage_max_chars,
        "max_new_tokens": cfg.max_new_tokens, "stop": list(cfg.stop), "decoding": "greedy",
        "correct": "a gold answer contained in the normalised answer (expertrag.answers.contains_answer)",
    }
