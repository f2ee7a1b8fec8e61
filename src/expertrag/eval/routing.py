"""What the retrieval expert is routed for: its firing rate and the router's affinity, per prompt segment.

For each question, the MoE model reads two prompts exactly as the pipeline builds them:
- closed-book (no passages): the retrieval slot is unavailable, so it never fires, but the router's unmasked
  affinity for it (softmax probability of its slot) is what the `router` gate reads;
- open-book, as the pipeline builds it under `pipeline.fusion` (`ExpertRAG.open_book_inputs`): top-k
  passages in the prompt (concat), in the retrieval expert's memory only with the closed-book prompt
  (expert), or both; the routing rule of `moe.router.route` is applied to the recorded router logits, so
  "fired" means exactly what the layer did.
Each prompt token is put in one segment by character offsets into the rendered chat text: `passages` (the
numbered passage block), `question` (the question itself) or `template` (chat markup, instructions, labels).
Reported per segment and per MoE layer: the share of tokens on which the retrieval expert fired and the mean
affinity; and, when labels are given, the mean question-token affinity per label, closed- and open-book.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from expertrag.data.types import Question
from expertrag.gate.labels import LabelRecord
from expertrag.model.prompts import closed_book_messages, format_passages
from expertrag.moe.router import route

SEGMENTS = ("passages", "question", "template")


def token_segments(tokenizer: Any, messages: Sequence[Mapping[str, str]], spans: Mapping[str, str]) -> tuple[list[int], list[str]]:
    """The prompt's token ids (as `model.generation.encode_prompt` makes them) and each token's segment:
    the name of the first span in `spans` (name -> text, searched from the end of the rendered prompt) whose
    characters it overlaps, else "template"."""
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ranges = []
    for name, s in spans.items():
        at = text.rfind(s) if s else -1
        if at >= 0:
            ranges.append((name, at, at + len(s)))
    segs = []
    for a, b in enc["offset_mapping"]:
        seg = "template"
        for name, lo, hi in ranges:
            if a < hi and b > lo:
                seg = name
                break
        segs.append(seg)
    return list(enc["input_ids"]), segs


def _moe_layers(model: Any) -> dict[int, Any]:
    return {i: layer.mlp for i, layer in enumerate(model.layers) if getattr(layer.mlp, "retrieval", None) is not None}


def _prompt_routing(generator: Any, messages: Any, spans: Mapping[str, str], passages: Any) -> dict[str, Any]:
    """Per MoE layer: [T] fired (bool) and affinity (float) over the prompt's tokens, and their segments."""
    ids, segs = token_segments(generator.tokenizer, messages, spans)
    g = generator.generate(messages, max_new_tokens=1, passages=passages, return_router=True)
    if g.prompt_tokens != len(ids):
        raise RuntimeError(f"prompt has {g.prompt_tokens} tokens but the segment map {len(ids)}")
    layers = _moe_layers(generator.model)
    out: dict[int, dict[str, np.ndarray]] = {}
    for i, aux in enumerate(g.router or []):
        if aux is None or i not in layers or aux.retrieval_affinity is None:
            continue
        mlp = layers[i]
        logits = aux.router_logits.float()[-len(ids):]
        available = torch.full((logits.shape[0],), passages is not None, dtype=torch.bool)
        r = route(logits, mlp.num_experts, mlp.top_k, mlp.cfg.renormalize, available)
        if int(r.retrieval_fire.sum()) != int(aux.tokens_per_expert[-1]):  # the layer's own count
            raise RuntimeError(f"layer {i}: re-derived routing fired {int(r.retrieval_fire.sum())} times, the layer "
                               f"{int(aux.tokens_per_expert[-1])}")
        out[i] = {"fired": r.retrieval_fire.numpy().astype(bool),
                  "affinity": aux.retrieval_affinity.float().reshape(-1)[-len(ids):].numpy()}
    return {"segments": np.asarray(segs), "layers": out}


def _summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per segment: fired share and mean affinity over all tokens of all prompts and all layers; per layer too."""
    if not rows:
        return {}
    layer_ids = sorted({i for r in rows for i in r["layers"]})
    seg_out: dict[str, Any] = {}
    for seg in SEGMENTS:
        fired, aff, per_layer = [], [], {}
        for i in layer_ids:
            f_i, a_i = [], []
            for r in rows:
                m = r["segments"] == seg
                if i in r["layers"] and m.any():
                    f_i.append(r["layers"][i]["fired"][m])
                    a_i.append(r["layers"][i]["affinity"][m])
            if f_i:
                f, a = np.concatenate(f_i), np.concatenate(a_i)
                per_layer[str(i)] = {"fired": float(f.mean()), "affinity": float(a.mean()), "tokens": int(f.size)}
                fired.append(f)
                aff.append(a)
        if fired:
            seg_out[seg] = {"fired": float(np.concatenate(fired).mean()), "affinity": float(np.concatenate(aff).mean()),
                            "tokens_per_layer": int(sum(r["segments"].tolist().count(seg) for r in rows)),
                            "layers": per_layer}
    return seg_out


def _question_affinity(r: dict[str, Any]) -> float | None:
    vals = [lay["affinity"][r["segments"] == "question"] for lay in r["layers"].values()]
    vals = [v for v in vals if v.size]
    return float(np.concatenate(vals).mean()) if vals else None


def retrieval_routing(rag: Any, questions: Sequence[Question], labels: Mapping[str, LabelRecord] | None = None,
                      progress: bool | None = None) -> dict[str, Any]:
    """Closed- and open-book routing of the retrieval expert over `questions` (module doc). `rag` is an
    ExpertRAG whose generator is an MoE model with a retrieval expert; its config gives k and passage length."""
    from expertrag.pipeline.rag import PipelineGateContext

    gen = rag.generator
    if not _moe_layers(gen.model):
        raise ValueError("the model has no retrieval expert: set model.checkpoint to an MoE checkpoint")
    closed_rows, open_rows, per_q = [], [], []
    for q in tqdm(questions, desc="routing", unit="q", disable=None if progress is None else not progress):
        c = _prompt_routing(gen, closed_book_messages(q.question), {"question": q.question}, None)
        hits = PipelineGateContext(rag, q.question, {}, None).retrieve(rag.config.k)
        block = format_passages(hits, rag.config.passage_max_chars)
        messages, memory = rag.open_book_inputs(q.question, hits)  # as the pipeline answers, under its fusion
        o = _prompt_routing(gen, messages, {"passages": block, "question": q.question}, memory)
        closed_rows.append(c)
        open_rows.append(o)
        lab = labels.get(q.id) if labels else None
        per_q.append({"id": q.id, "label": lab.label if lab else None,
                      "closed_question_affinity": _question_affinity(c),
                      "open_question_affinity": _question_affinity(o),
                      "open_fired_passages": float(np.mean([lay["fired"][o["segments"] == "passages"].mean()
                                                            for lay in o["layers"].values()]))
                      if (o["segments"] == "passages").any() else None})
    by_label: dict[str, Any] = {}
    for lab in sorted({p["label"] for p in per_q if p["label"]}):
        ps = [p for p in per_q if p["label"] == lab]
        by_label[lab] = {"n": len(ps)} | {
            key: float(np.mean([p[key] for p in ps if p[key] is not None]))
            for key in ("closed_question_affinity", "open_question_affinity", "open_fired_passages")
            if any(p[key] is not None for p in ps)}
    return {"n": len(questions), "fusion": rag.config.fusion,
            "closed_book": _summary(closed_rows), "open_book": _summary(open_rows),
            "by_label": by_label, "questions": per_q}


def render_routing_markdown(result: Mapping[str, Any]) -> str:
    from expertrag.eval.tables import fmt, table

    lines = ["# What the retrieval expert is routed for", "",
             f"{result['n']} questions; each read closed-book and open-book (module `expertrag.eval.routing`). "
             "Fired: share of the segment's tokens (all MoE layers) on which the retrieval expert fired. "
             "Affinity: the router's mean probability for the retrieval slot.", ""]
    rows = []
    for mode in ("closed_book", "open_book"):
        for seg, v in (result.get(mode) or {}).items():
            rows.append([mode.replace("_", "-"), seg, v["tokens_per_layer"], fmt(v["fired"]), fmt(v["affinity"])])
    lines += table(["prompt", "segment", "tokens", "fired", "affinity"], rows)
    if result.get("by_label"):
        lines += ["", "## By label (question tokens)", ""]
        lines += table(["label", "n", "closed-book affinity", "open-book affinity", "fired on passages"],
                        [[lab, v["n"], fmt(v.get("closed_question_affinity")), fmt(v.get("open_question_affinity")),
                          fmt(v.get("open_fired_passages"))] for lab, v in result["by_label"].items()])
    seg = (result.get("open_book") or {})
    if seg:
        layers = sorted({int(i) for v in seg.values() for i in v["layers"]})
        lines += ["", "## Open-book, per MoE layer: fired share (passages / question / template)", ""]
        lines += table(["layer"] + list(seg), [[i] + [fmt(seg[s]["layers"].get(str(i), {}).get("fired")) for s in seg]
                                                for i in layers])
    return "\n".join(lines).rstrip() + "\n"
