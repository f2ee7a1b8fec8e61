"""The MiniLM forward alone on ONNX Runtime fp32 / int8, OpenVINO on the fp32 graph and on the int8 file:
1 thread, the first 256 wiki_vital passages (<= 200 tokens), batches of 32 sorted by length and tokenised once,
3 interleaved rounds, medians; cosine of each to ORT fp32. Needs the onnx exports made (run any onnx-int8 build
first) and the shared data folder.

    python scripts/embed_forward_bench.py ../shared/data
"""
import glob
import itertools
import json
import statistics as st
import sys
import time

import numpy as np
import onnxruntime as ort
import openvino as ov
from transformers import AutoTokenizer

from expertrag.paths import cache_dir

PASSAGES, BATCH, ROUNDS = 256, 32, 3

root = str(cache_dir() / "onnx")
d = glob.glob(root + "/*-fp32")[0]
d8 = glob.glob(root + "/*-int8")[0]
with open(d + "/export.json", encoding="utf-8") as f:
    tok = AutoTokenizer.from_pretrained(json.load(f)["model"])
with open(sys.argv[1] + "/corpora/wiki_vital.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in itertools.islice(f, PASSAGES)]
texts = sorted((f"{r.get('title', '')}. {r.get('contents', r.get('text', ''))}" for r in rows), key=len)
batches = []
for i in range(0, len(texts), BATCH):
    e = tok(texts[i:i + BATCH], padding=True, truncation=True, max_length=200, return_tensors="np")
    batches.append({"input_ids": e["input_ids"].astype(np.int64), "attention_mask": e["attention_mask"].astype(np.int64),
                    "token_type_ids": np.zeros_like(e["input_ids"], dtype=np.int64)})


def ort_sess(path):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.inter_op_num_threads = 1
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    return lambda b: s.run(None, b)[0]


core = ov.Core()
core.set_property("CPU", {"INFERENCE_NUM_THREADS": 1})


def ov_model(path, hint=None):
    cfg = {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if hint:
        cfg["INFERENCE_PRECISION_HINT"] = hint
    m = core.compile_model(path, "CPU", cfg)
    req = m.create_infer_request()
    names = [p.get_any_name() for p in m.inputs]
    return lambda b: req.infer({n: b[n] for n in names})[0]


def normalised(out):
    v = np.asarray(out)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


engines = {"ort_fp32": ort_sess(d + "/model.onnx"), "ort_int8": ort_sess(d8 + "/model.onnx"),
           "ov_fp32": ov_model(d + "/model.onnx"), "ov_on_int8_onnx": ov_model(d8 + "/model.onnx")}
ref = [engines["ort_fp32"](b) for b in batches]
for name, fwd in engines.items():
    cos = np.concatenate([(normalised(fwd(b)) * normalised(r)).sum(1) for b, r in zip(batches, ref, strict=True)])
    print(name, f"cos vs ort fp32 mean {cos.mean():.5f} min {cos.min():.5f}")
times = {n: [] for n in engines}
for _ in range(ROUNDS):  # interleaved, so a load change on the shared box hits every engine alike
    for n, fwd in engines.items():
        t = time.perf_counter()
        for b in batches:
            fwd(b)
        times[n].append(time.perf_counter() - t)
base = st.median(times["ort_fp32"])
for n, ts in times.items():
    print(f"{n}: {len(texts) / st.median(ts):.1f} passages/s, {base / st.median(ts):.2f}x ort_fp32")
