// ExpertRAG's page: streams /v1/answer (Server-Sent Events over fetch) and charts /v1/stats.
"use strict";
const $ = (id) => document.getElementById(id);
const keyBox = $("key");
keyBox.value = localStorage.getItem("expertrag-key") || "";
keyBox.addEventListener("change", () => localStorage.setItem("expertrag-key", keyBox.value.trim()));
const headers = () => ({ "Content-Type": "application/json", "Authorization": "Bearer " + keyBox.value.trim() });

function show(view) {
  $("view-ask").hidden = view !== "ask";
  $("view-metrics").hidden = view !== "metrics";
  $("tab-ask").classList.toggle("on", view === "ask");
  $("tab-metrics").classList.toggle("on", view === "metrics");
  if (view === "metrics") refreshMetrics();
}
$("tab-ask").onclick = () => show("ask");
$("tab-metrics").onclick = () => show("metrics");

function text(el, s) { el.textContent = s; return el; }
function make(tag, attrs, s) {
  const el = document.createElement(tag);
  Object.entries(attrs || {}).forEach(([k, v]) => el.setAttribute(k, v));
  if (s !== undefined) el.textContent = s;
  return el;
}

function renderDecision(g) {
  const d = $("decision");
  d.replaceChildren(make("span", { class: "pill " + g.decision, "data-decision": g.decision },
    g.decision === "retrieve" ? "retrieved" : "answered from memory"),
    document.createTextNode(` policy ${g.policy}, stage ${g.stage}, score ${Number(g.score).toFixed(3)}`));
}

function renderPassages(list) {
  const ol = $("passages");
  ol.replaceChildren();
  $("passages-title").hidden = list.length === 0;
  list.forEach((p, i) => {
    const li = make("li", { id: "p-" + (i + 1), "data-id": p.id });
    li.append(make("strong", {}, (p.title || "untitled") + " "), make("span", { class: "muted" }, "(" + p.id + ") "),
      document.createTextNode(p.snippet));
    ol.append(li);
  });
}

function renderFinal(a) {
  text($("answer"), a.text);
  const c = $("citations");
  c.replaceChildren();
  a.citations.forEach((ci) => {
    const link = make("a", { href: "#p-" + ci.marker, class: "citation", "data-id": ci.id }, `[${ci.marker}] ${ci.title}`);
    c.append(link, document.createTextNode(" "));
  });
  const t = a.timings;
  text($("timings"), `total ${t.total_ms.toFixed(0)} ms: gate ${t.gate_ms.toFixed(0)}, probe ${t.probe_ms.toFixed(0)}, ` +
    `retrieval ${t.retrieval_ms.toFixed(0)}, generation ${t.generation_ms.toFixed(0)}` +
    (a.abstained ? " (abstained: not sure enough)" : "") + (t.cache !== "miss" ? `; cache: ${t.cache}` : ""));
  $("result").dataset.done = "1";
}

async function ask(ev) {
  ev.preventDefault();
  const q = $("question").value.trim();
  if (!q) return;
  $("result").hidden = false;
  delete $("result").dataset.done;
  ["answer", "decision", "citations", "timings", "error"].forEach((id) => text($(id), ""));
  renderPassages([]);
  let resp;
  try {
    resp = await fetch("/v1/answer", { method: "POST", headers: headers(), body: JSON.stringify({ question: q, stream: true }) });
  } catch (e) { text($("error"), "network error: " + e); return; }
  if (!resp.ok) {
    const body = await resp.json().catch(() => ({}));
    text($("error"), (body.error && body.error.message) || resp.statusText);
    return;
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let event = "message", data = "";
      block.split("\n").forEach((line) => {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      });
      const d = JSON.parse(data);
      if (event === "decision") renderDecision(d.gate);
      else if (event === "passages") renderPassages(d.passages);
      else if (event === "token") $("answer").textContent += d.text;
      else if (event === "answer") { renderPassages(d.passages); renderFinal(d); }
      else if (event === "error") text($("error"), d.error.message);
    }
  }
}
$("ask-form").addEventListener("submit", ask);

function bars(el, entries, fmt) {
  el.replaceChildren();
  entries.forEach(([name, v]) => {
    const row = make("div", { class: "barrow" });
    const track = make("div", {});
    track.append(make("div", { class: "bar", style: `width:${Math.max(0, Math.min(1, v)) * 100}%` }));
    row.append(make("span", {}, name), track, make("span", {}, fmt(v)));
    el.append(row);
  });
}
const pct = (v) => (v * 100).toFixed(0) + "%";

async function refreshMetrics() {
  if ($("view-metrics").hidden) return;
  const resp = await fetch("/v1/stats", { headers: headers() }).catch(() => null);
  if (resp && resp.ok) {
    const s = await resp.json();
    text($("m-summary"), `${s.answers} answer${s.answers === 1 ? "" : "s"}` + (s.tokens_per_s ? `, ${s.tokens_per_s.toFixed(1)} generated tokens/s` : ""));
    bars($("m-rate"), s.retrieval_rate === null ? [] : [["retrieved", s.retrieval_rate]], pct);
    bars($("m-stages"), Object.entries(s.stage_shares), pct);
    const worst = Math.max(s.latency_ms_p95 || 0, 1);
    bars($("m-latency"), s.latency_ms_p50 === null ? [] : [["p50", s.latency_ms_p50 / worst], ["p95", s.latency_ms_p95 / worst]],
      (v) => (v * worst).toFixed(0) + " ms");
    const layers = Object.entries(s.expert_mean_share);
    if (layers.length) {
      const el = $("m-experts");
      el.replaceChildren();
      layers.forEach(([layer, shares]) => {
        const sub = make("div", {});
        el.append(make("div", { class: "muted" }, "layer " + layer), sub);
        bars(sub, shares.map((v, i) => ["expert " + i, v]), pct);
      });
    }
  }
  setTimeout(refreshMetrics, 2000);
}
