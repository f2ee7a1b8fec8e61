"""A Markdown report of an `evaluate` result, with PNG figures written beside it.

Figures (matplotlib, Agg canvas through `matplotlib.figure.Figure`: no pyplot, no global backend state):
accuracy vs retrieval rate (each policy a point, threshold sweeps as curves), latency CDF per policy,
expert utilisation heatmaps (layers x experts, when the model reported shares), gate reliability diagram
(binned score vs observed need, for policies whose scores lie in [0, 1]) and context dilution (accuracy of
`always` against k). A figure with nothing to show is not written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from expertrag.eval.tables import fmt, table
from expertrag.fileio import atomic_write_text

ACC_FIG = "accuracy_vs_retrieval.png"
LAT_FIG = "latency_cdf.png"
EXPERT_FIG = "expert_utilisation.png"
REL_FIG = "gate_reliability.png"
DIL_FIG = "context_dilution.png"


def _ms(v: Any) -> str:
    return fmt(v, 0) if isinstance(v, float) and abs(v) >= 100 else fmt(v, 1)


def _x(v: Any) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _figure(w: float = 6.4, h: float = 4.4):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _colors(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(names)}


# ------------------------------------------------------------------------------------------- figures


def plot_accuracy_vs_retrieval(result: Mapping[str, Any], path: Path, point_label: str = "measured") -> Path | None:
    res = result.get("results") or {}
    pts = [(p, r["overall"]) for p, r in res.items()
           if r["overall"].get("accuracy") is not None and r["overall"].get("retrieval_rate") is not None]
    if not pts:
        return None
    colors = _colors(list(res))
    fig = _figure()
    ax = fig.add_subplot()
    for p, r in res.items():
        sw = r.get("sweep")
        if sw and sw.get("points"):
            xs = [q["retrieval_rate"] for q in sw["points"]]
            ys = [q["accuracy"] for q in sw["points"]]
            order = np.argsort(xs, kind="stable")
            ax.plot(np.asarray(xs)[order], np.asarray(ys)[order], "-", color=colors[p], alpha=0.6, lw=1.2,
                    label=f"{p} sweep (labels, n={sw['n']})")
    chord = next((r["sweep"] for r in res.values() if r.get("sweep")), None)
    if chord:  # a gate that retrieves for a random share r of questions scores on this line on average
        ax.plot([0, 1], [chord["never_accuracy"], chord["always_accuracy"]], "--", color="grey", lw=1,
                label="random gate (expected)")
    for p, o in pts:
        ax.scatter([o["retrieval_rate"]], [o["accuracy"]], color=colors[p], s=60, zorder=3, edgecolor="black",
                   label=f"{p} ({point_label})")
        ax.annotate(p, (o["retrieval_rate"], o["accuracy"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("retrieval rate")
    ax.set_ylabel("accuracy (gold answer contained)")
    ax.set_xlim(-0.03, 1.03)
    ax.set_title("Accuracy vs retrieval rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.savefig(path)
    return path


def plot_latency_cdf(result: Mapping[str, Any], path: Path) -> Path | None:
    by_policy: dict[str, list[float]] = {}
    shown = set(result.get("policies") or [])  # not the context-dilution runs, which are records too
    for r in result.get("records") or []:
        if r.get("latency_ms") is not None and not r.get("error") and (not shown or r["policy"] in shown):
            by_policy.setdefault(r["policy"], []).append(float(r["latency_ms"]))
    if not by_policy:
        return None
    colors = _colors(list(result.get("results") or by_policy))
    fig = _figure()
    ax = fig.add_subplot()
    for p, lat in by_policy.items():
        x = np.sort(lat)
        y = np.arange(1, x.size + 1) / x.size
        ax.step(x, y, where="post", color=colors.get(p), label=f"{p} (n={x.size})")
    ax.set_xlabel("latency per question (ms)")
    ax.set_ylabel("share of questions ≤ latency")
    ax.set_title("Latency CDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def plot_expert_heatmaps(result: Mapping[str, Any], path: Path) -> Path | None:
    panels = []
    for p, r in (result.get("results") or {}).items():
        ex = r["overall"].get("experts")
        if not ex or not ex.get("layers"):
            continue
        layers = list(ex["layers"])
        width = max(len(ex["layers"][lay]["share"]) for lay in layers)
        m = np.full((len(layers), width), np.nan)
        for i, lay in enumerate(layers):
            s = ex["layers"][lay]["share"]
            m[i, :len(s)] = s
        panels.append((p, layers, m, bool(ex.get("retrieval_slot"))))
    if not panels:
        return None
    fig = _figure(3.2 * len(panels) + 1.0, max(3.0, 0.18 * max(len(pl[1]) for pl in panels) + 1.5))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    im = None
    for ax, (p, layers, m, has_r) in zip(axes, panels, strict=True):
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(np.nanmax(m)), 1e-6))
        ticks = [str(i) for i in range(m.shape[1])]
        if has_r:
            ticks[-1] = "R"
        ax.set_xticks(range(m.shape[1]), ticks, fontsize=7)
        step = max(1, len(layers) // 16)
        ax.set_yticks(range(0, len(layers), step), layers[::step], fontsize=7)
        ax.set_xlabel("expert (R = retrieval)" if has_r else "expert")
        ax.set_ylabel("layer")
        ax.set_title(p, fontsize=9)
    fig.colorbar(im, ax=list(axes), label="token share")
    fig.suptitle("Expert utilisation (mean token share per layer)")
    fig.savefig(path)
    return path


def plot_reliability(result: Mapping[str, Any], path: Path) -> Path | None:
    curves = []
    for p, r in (result.get("results") or {}).items():
        gq = r["overall"].get("gate_quality") or {}
        bins = [b for b in gq.get("reliability") or [] if b.get("count")]
        if bins and p not in ("never", "always"):
            curves.append((p, bins))
    if not curves:
        return None
    colors = _colors(list(result.get("results") or {}))
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    for p, bins in curves:
        ax.plot([b["mean_score"] for b in bins], [b["observed"] for b in bins], "o-", color=colors.get(p),
                label=f"{p} (n={sum(b['count'] for b in bins)})")
    ax.set_xlabel("predicted score (bin mean)")
    ax.set_ylabel("observed share needing retrieval")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Gate reliability")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def plot_dilution(result: Mapping[str, Any], path: Path) -> Path | None:
    dil = result.get("context_dilution") or {}
    ks = sorted((int(k), v) for k, v in dil.items() if v.get("accuracy") is not None)
    if not ks:
        return None
    fig = _figure(5.0, 3.6)
    ax = fig.add_subplot()
    ax.plot([k for k, _ in ks], [v["accuracy"] for _, v in ks], "o-")
    ax.set_xscale("log")
    ax.set_xticks([k for k, _ in ks], [str(k) for k, _ in ks])
    ax.set_xlabel("passages in the prompt (k)")
    ax.set_ylabel("accuracy of `always`")
    ax.set_title("Context dilution")
    ax.grid(alpha=0.3)
    fig.savefig(path)
    return path


# ------------------------------------------------------------------------------------------- markdown


def render_markdown(result: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    res = result.get("results") or {}
    summ = result.get("summary") or {}
    lines = ["# ExpertRAG evaluation", ""]
    lines.append(f"Created {result.get('created', '?')}; seed {result.get('seed')}; "
                 f"limit {result.get('limit') or 'all'}; {len(result.get('records') or [])} answers in "
                 f"{fmt(result.get('duration_s'), 0)} s.")
    m = result.get("machine") or {}
    pk = result.get("packages") or {}
    lines.append(f"Machine: {m.get('platform', '?')}, {m.get('cpu_count', '?')} CPUs "
                 f"({m.get('cpus_usable', '?')} usable), torch threads {m.get('torch_threads', '?')}. "
                 "Packages: " + ", ".join(f"{k} {v}" for k, v in pk.items() if v) + ".")
    lines.append("")
    ds = result.get("datasets") or {}
    if ds:
        lines += ["## Datasets", ""]
        lines += table(["dataset", "questions", "evaluated", "labelled", "sha256"],
                        [[n, d.get("questions"), d.get("evaluated"), d.get("labelled"),
                          (d.get("sha256") or "–")[:16]] for n, d in ds.items()])
    wl = result.get("workload")
    if wl:
        lines += ["## Workload", "", f"{wl.get('size')} questions (requested {wl.get('requested')}); available: "
                  + ", ".join(f"{k} {v}" for k, v in (wl.get("available") or {}).items()) + "; used: "
                  + ", ".join(f"{k} {v}" for k, v in (wl.get("used") or {}).items()) + "."]
        lines += [f"- {n}" for n in wl.get("notes") or []] + [""]
    skipped = result.get("skipped") or {}
    if skipped:
        lines += ["## Skipped", ""] + [f"- **{p}**: {why}" for p, why in skipped.items()] + [""]

    lines += ["## Policies", "",
              "Accuracy: a normalised gold answer is contained in the model's words (PopQA-style); latency is "
              "the whole answer (gate, probe, retrieval, generation) in ms.", ""]
    rows = []
    for p, r in res.items():
        o = r["overall"]
        rows.append([p, o["n"], fmt(o["accuracy"]), fmt(o["em"]), fmt(o["f1"]), fmt(o["retrieval_rate"]),
                     fmt(o["abstain_rate"]), _ms(o["latency_ms_mean"]), _ms(o["latency_ms_p50"]),
                     _ms(o["latency_ms_p95"]), _ms(o["latency_ms_p99"]), fmt(o["ms_per_generated_token"], 1),
                     fmt(o["mean_prompt_tokens"], 0), fmt(o["gate_overhead_share"]), _x(r.get("speedup_vs_always"))])
    lines += table(["policy", "n", "acc", "EM", "F1", "retrieval", "abstain", "mean ms", "p50", "p95", "p99",
                     "ms/token", "prompt tok", "gate share", "speed-up vs always"], rows)

    lines += ["## Speed-up of adaptive over always", ""]
    ad = summ.get("adaptive_policy", "adaptive")
    lines += table(["", "speed-up"], [
        [f"overall ({ad} vs always, mean latency)", _x(summ.get("speedup_adaptive_vs_always"))],
        ["no-retrieval half (closed-book-correct questions)", _x(summ.get("speedup_no_retrieval_half"))]])
    group_rows = []
    for p, r in res.items():
        for g, o in (r.get("groups") or {}).items():
            group_rows.append([p, g, o["n"], fmt(o["accuracy"]), fmt(o["retrieval_rate"]),
                               _ms(o["latency_ms_mean"]), _ms(o["latency_ms_p95"])])
    if group_rows:
        lines += ["### By group", ""]
        lines += table(["policy", "group", "n", "acc", "retrieval", "mean ms", "p95 ms"], group_rows)

    if len(ds) > 1:
        names = list(ds)
        lines += ["## By dataset (accuracy / retrieval rate)", ""]
        lines += table(["policy"] + names, [[p] + [
            f"{fmt(r['datasets'].get(d, {}).get('accuracy'))} / {fmt(r['datasets'].get(d, {}).get('retrieval_rate'))}"
            for d in names] for p, r in res.items()])

    stage_rows = [[p, ", ".join(f"{s} {v:.0%}" for s, v in r["overall"]["stages"].items())] for p, r in res.items()]
    if stage_rows:
        lines += ["## Gate stages (share of questions decided)", ""] + table(["policy", "stages"], stage_rows)

    gq_rows = []
    for p, r in res.items():
        g = r["overall"].get("gate_quality")
        if g:
            gq_rows.append([p, g["n"], f"{g['positives']}/{g['negatives']}", fmt(g["precision"]), fmt(g["recall"]),
                            fmt(g["f1"]), fmt(g["auroc"]), g["n_scored"]])
    if gq_rows:
        lines += ["## Gate quality against labels", "",
                  "Need = the label's training target (both_wrong counted as "
                  f"{(result.get('settings') or {}).get('both_wrong_as', 'retrieve')}); precision/recall/F1 of "
                  "deciding to retrieve; AUROC of the gate score.", ""]
        lines += table(["policy", "n", "need / no need", "precision", "recall", "F1", "AUROC", "scored"], gq_rows)

    sw_rows = []
    for p, r in res.items():
        sw = r.get("sweep")
        if sw:
            b, op = sw["best"], sw["operating_point"]
            sw_rows.append([p, sw["n"], f"{fmt(op['retrieval_rate'])} → {fmt(op['label_accuracy'])} "
                            f"(measured {fmt(op['measured_accuracy'])})",
                            f"t={fmt(b['threshold'])}: {fmt(b['retrieval_rate'])} → {fmt(b['accuracy'])}",
                            fmt(sw["never_accuracy"]), fmt(sw["always_accuracy"]), fmt(sw["oracle_accuracy"])])
    if sw_rows:
        lines += ["## Threshold sweep", "",
                  "Recomputed from the recorded gate scores and the labels' closed/open-book correctness, without "
                  "rerunning the model (see `expertrag.eval.gate_quality`). Retrieval rate → accuracy.", ""]
        lines += table(["policy", "n", "as run", "best", "never", "always", "oracle"], sw_rows)

    dil = result.get("context_dilution") or {}
    if dil:
        lines += ["## Context dilution (`always`, k passages)", ""]
        lines += table(["k", "n", "acc", "EM", "F1", "prompt tok", "mean ms"],
                        [[k, v["n"], fmt(v["accuracy"]), fmt(v["em"]), fmt(v["f1"]),
                          fmt(v["mean_prompt_tokens"], 0), _ms(v["latency_ms_mean"])]
                         for k, v in sorted(dil.items(), key=lambda kv: int(kv[0]))])

    ex_rows = []
    for p, r in res.items():
        ex = r["overall"].get("experts")
        if ex:
            ent = [lay["normalized_entropy"] for lay in ex["layers"].values() if lay["normalized_entropy"] is not None]
            ex_rows.append([p, len(ex["layers"]), fmt(float(np.mean(ent)) if ent else None),
                            fmt(ex.get("retrieval_expert_share")),
                            "; ".join(ex["collapse"][:4]) + (" …" if len(ex["collapse"]) > 4 else "") or "none"])
    if ex_rows:
        lines += ["## Expert utilisation", ""]
        lines += table(["policy", "MoE layers", "mean norm. entropy", "retrieval expert share", "collapse flags"],
                        ex_rows)

    if figures:
        lines += ["## Figures", ""]
        for title, name in figures.items():
            lines += [f"![{title}]({name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(result: Mapping[str, Any], out_dir: str | Path, name: str = "report.md") -> Path:
    """Write `out_dir/name` and its PNG figures beside it; returns the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}
    for title, fname, fn in (("Accuracy vs retrieval rate", ACC_FIG, plot_accuracy_vs_retrieval),
                             ("Latency CDF", LAT_FIG, plot_latency_cdf),
                             ("Expert utilisation", EXPERT_FIG, plot_expert_heatmaps),
                             ("Gate reliability", REL_FIG, plot_reliability),
                             ("Context dilution", DIL_FIG, plot_dilution)):
        if fn(result, out / fname) is not None:
            figures[title] = fname
    path = out / name
    atomic_write_text(path, render_markdown(result, figures))
    return path
