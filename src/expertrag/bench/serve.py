"""`expertrag bench serve`: a bounded load test of the service on loopback, against the in-process pipeline
on the same questions, in one run.

1. In-process: `ExpertRAG.answer` on each question in turn (the reference: no HTTP, no queue).
2. The real `expertrag serve` in a subprocess on a free 127.0.0.1 port, with a throw-away key; then for each
   concurrency level a fixed number of `/v1/answer` requests from an asyncio httpx client, at most that many
   in flight. Every request has a deadline; the run stops by itself.
Caches are off, so every answer is real work. The model runs with the same intra-op thread count in both.

3. With `ray_replicas` (`--ray-replicas 1,2`): the same server started with `--ray` (its own local Ray
   cluster, all the machine's CPUs) and `serve.ray.replicas` = each count, the same warm-up and levels.
   All servers are started first (one after another) and stay up; with `rounds` > 1 (`--rounds`) each
   level's requests are split into that many blocks and the servers take turns in a rotating order, so a
   machine whose load drifts during the run does not favour whichever server runs last.
Reported: answers/s and p50/p95/p99 latency per level, errors, `http_overhead_ratio` (mean latency at
concurrency 1 over HTTP / in-process) and `batching_gain` (answers/s at the highest level / at 1); on Ray
also `ray_overhead_latency_c1` (mean latency at concurrency 1, Ray 1 replica / in-process serve),
`ray_overhead_throughput_top` (answers/s at the top level, in-process serve / Ray 1 replica),
`ray_2_over_1_answers_per_s_top` and the peak RSS (VmHWM) of the server process (the Ray driver) and of each
Serve replica (pipeline, ingress), the controller and the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from expertrag.data.questions import load_questions
from expertrag.errors import InputError
from expertrag.peak_rss import peak_rss_mb


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def _load(url: str, key: str, questions: list[str], requests: int, concurrency: int, max_tokens: int,
                timeout: float) -> dict[str, Any]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def one(client: httpx.AsyncClient, i: int) -> None:
        async with sem:
            t = time.perf_counter()
            try:
                r = await client.post("/v1/answer", json={"question": questions[i % len(questions)],
                                                          "max_tokens": max_tokens})
                if r.status_code == 200:
                    latencies.append((time.perf_counter() - t) * 1000)
                else:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
            except httpx.HTTPError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout,
                                 limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(requests)))
        wall = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": requests, "answers": len(latencies), "latencies": latencies,
            "answers_per_s": len(latencies) / wall if wall > 0 else float("nan"), "wall_s": wall,
            "mean_ms": float(np.mean(latencies)) if latencies else float("nan"),
            "p50_ms": _pct(latencies, 50), "p95_ms": _pct(latencies, 95), "p99_ms": _pct(latencies, 99),
            "errors": sum(errors.values()), "errors_by_kind": errors}


def uncached_pipeline(index: Path, policy: str, max_tokens: int):
    """The pipeline every server of this bench runs (package defaults, caches off), loaded in this process."""
    from expertrag.pipeline.build import PipelineSections, load_pipeline
    from expertrag.pipeline.config import PipelineConfig

    sections = PipelineSections()
    sections.pipeline = PipelineConfig(max_new_tokens=max_tokens, answer_cache_size=0, retrieval_cache_size=0)
    sections.gate.policy = policy
    return load_pipeline(index, sections, policy)


def run(index: Path, *, questions: Path | None = None, requests: int = 32, concurrency: tuple[int, ...] = (1, 4, 16),
        policy: str = "always", max_tokens: int = 16, threads: int = 1, timeout: float = 600.0,
        progress: bool = True, ray_replicas: tuple[int, ...] = (), rounds: int = 1,
        batch_wait_ms: float | None = None, ray_max_ongoing: int | None = None) -> dict[str, Any]:
    import torch

    if not (Path(index) / "manifest.json").exists():
        raise InputError(f"{index}: not an index directory (no manifest.json)")
    if questions is None:
        from importlib.resources import files

        questions = Path(str(files("expertrag.assets").joinpath("demo_questions.jsonl")))
    qs = [q.question for q in load_questions(questions)]
    if not qs:
        raise InputError(f"{questions}: no questions")
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)

    # 1. in-process reference
    torch.set_num_threads(threads)
    rag = uncached_pipeline(index, policy, max_tokens)
    rag.answer(qs[0])  # warm-up: lazy loads, allocator
    ref_n = min(requests, len(qs) * 2)
    say(f"in-process: {ref_n} answers, {threads} thread(s)")
    lat = []
    t0 = time.perf_counter()
    for i in range(ref_n):
        t = time.perf_counter()
        rag.answer(qs[i % len(qs)])
        lat.append((time.perf_counter() - t) * 1000)
    in_process = {"answers": ref_n, "answers_per_s": ref_n / (time.perf_counter() - t0),
                  "mean_ms": float(np.mean(lat)), "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99)}
    del rag

    # 2. the service, in process; 3. the service on Ray Serve with each replica count, the same load
    cfg = {"gate": {"policy": policy},
           "pipeline": {"max_new_tokens": max_tokens, "answer_cache_size": 0, "retrieval_cache_size": 0},
           "serve": {"torch_threads": threads, "rate_limit_per_minute": 0,
                     "queue_size": max(64, max(concurrency) * 2), "batch_max": max(concurrency),
                     "request_timeout_s": timeout, "max_tokens_cap": max(256, max_tokens)}}
    if batch_wait_ms is not None:
        # behind Ray's two hops a block's requests reach the replica milliseconds apart: the window decides
        # whether they share a batch
        cfg["serve"]["batch_wait_ms"] = batch_wait_ms
    # Serve routes a request to one of two sampled replicas by their queue lengths, and lets a replica take up
    # to max_ongoing_requests: a lower cap forces a more even split (measured in RESULTS.md)
    ray_extra = {"max_ongoing_requests": ray_max_ongoing} if ray_max_ongoing is not None else {}
    servers = [("serve", cfg, [])] + [
        (f"ray{n}", {**cfg, "serve": {**cfg["serve"], "ray": {"replicas": n, "threads_per_replica": threads,
                                                              **ray_extra}}},
         ["--ray"]) for n in ray_replicas]
    block = -(-requests // rounds)  # requests per level, server and round
    lat: dict[tuple[str, int], list[float]] = {}
    walls: dict[tuple[str, int], float] = {}
    errs: dict[tuple[str, int], dict[str, int]] = {}
    memory: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        up = {}
        for name, scfg, extra in servers:  # one after another: no two model loads at once
            say(f"starting {name}")
            up[name] = stack.enter_context(_server(index, scfg, extra, threads, timeout))
            asyncio.run(_load(up[name]["url"], up[name]["key"], qs, 1, 1, max_tokens, timeout))  # warm-up
        # rounds rotate the order of the servers, so a load that drifts during the run (a shared machine)
        # falls on each of them alike; every server gets the same questions in the same order
        for r in range(rounds):
            order = [servers[(i + r) % len(servers)][0] for i in range(len(servers))]
            for name in order:
                for c in concurrency:
                    say(f"round {r + 1}/{rounds}: {name}, {block} answers at concurrency {c}")
                    res = asyncio.run(_load(up[name]["url"], up[name]["key"], qs, block, c, max_tokens, timeout))
                    lat.setdefault((name, c), []).extend(res["latencies"])
                    walls[(name, c)] = walls.get((name, c), 0.0) + res["wall_s"]
                    for k, v in res["errors_by_kind"].items():
                        errs.setdefault((name, c), {})[k] = errs.get((name, c), {}).get(k, 0) + v
        for name in up:
            memory[name] = {"server": _peak_mb(up[name]["pid"]), **_replica_peaks(up[name]["pid"]),
                            "ready_s": up[name]["ready_s"]}

    def levels_of(name: str) -> list[dict[str, Any]]:
        out = []
        for c in concurrency:
            v, wall, e = lat.get((name, c), []), walls[(name, c)], errs.get((name, c), {})
            out.append({"concurrency": c, "requests": block * rounds, "answers": len(v),
                        "answers_per_s": len(v) / wall if wall > 0 else float("nan"), "wall_s": wall,
                        "mean_ms": float(np.mean(v)) if v else float("nan"), "p50_ms": _pct(v, 50),
                        "p95_ms": _pct(v, 95), "p99_ms": _pct(v, 99), "errors": sum(e.values()), "errors_by_kind": e,
                        "latencies_ms": [round(x, 1) for x in v]})  # kept: outliers need their order to be read
        return out

    levels = levels_of("serve")
    on_ray = [{"replicas": n, "levels": levels_of(f"ray{n}"), "peak_rss_mb": memory[f"ray{n}"]} for n in ray_replicas]

    first, last = levels[0], levels[-1]
    best = max(levels, key=lambda r: r["answers_per_s"])
    out = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": threads},
        "policy": policy, "max_tokens": max_tokens, "requests_per_level": requests, "in_process": in_process,
        "batch_wait_ms": batch_wait_ms,  # the servers' batch window (null: serve.batch_wait_ms's default)
        "ray_max_ongoing": ray_max_ongoing,  # null: serve.ray.max_ongoing_requests's default
        "levels": levels,
        "answers_per_s": best["answers_per_s"], "p50_ms": last["p50_ms"], "p99_ms": last["p99_ms"],
        "errors": sum(r["errors"] for r in levels) + sum(r["errors"] for x in on_ray for r in x["levels"]),
        "http_overhead_ratio": first["mean_ms"] / in_process["mean_ms"],
        "batching_gain": last["answers_per_s"] / first["answers_per_s"],
    }
    out["serve_peak_rss_mb"] = memory["serve"]  # the in-process server's VmHWM, for the Ray replicas' figures
    if on_ray:
        out["ray"] = on_ray
        one = next((x for x in on_ray if x["replicas"] == 1), None)
        two = next((x for x in on_ray if x["replicas"] == 2), None)
        if one is not None:  # Ray's cost at one replica: latency at concurrency 1, throughput at the top level
            out["ray_overhead_latency_c1"] = one["levels"][0]["mean_ms"] / first["mean_ms"]
            out["ray_overhead_throughput_top"] = last["answers_per_s"] / one["levels"][-1]["answers_per_s"]
        if one is not None and two is not None:
            out["ray_2_over_1_answers_per_s_top"] = two["levels"][-1]["answers_per_s"] / one["levels"][-1]["answers_per_s"]
    return out


@contextlib.contextmanager
def _server(index: Path, cfg: dict, extra: list[str], threads: int, timeout: float):
    """`expertrag serve [extra]` in a subprocess on a free loopback port, with a throw-away key; stopped
    (SIGTERM) at the end."""
    with tempfile.TemporaryDirectory(prefix="expertrag-bench-serve-") as tmp:
        tmp_path = Path(tmp)
        keys_file = tmp_path / "keys.json"
        cfg = {**cfg, "serve": {**cfg["serve"], "keys_file": str(keys_file)}}
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
        from expertrag.serve.keys import KeyStore

        key = KeyStore(keys_file).add("bench", [], admin=False)
        port = _free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
               "RAY_USAGE_STATS_ENABLED": "0"}
        log = open(tmp_path / "server.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "expertrag", "serve", "--index", str(index), "--config",
                                 str(tmp_path / "config.yaml"), "--port", str(port), *extra], stdout=log,
                                stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            t = time.perf_counter()
            _wait_ready(url, proc, tmp_path / "server.log")
            yield {"url": url, "key": key, "pid": proc.pid, "ready_s": time.perf_counter() - t}
        finally:
            proc.terminate()
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def _peak_mb(pid: int) -> float | None:
    return peak_rss_mb(pid)


def _replica_peaks(root: int) -> dict[str, list[float]]:
    """VmHWM of the Ray Serve replicas started under `root` (found by their process title, descendants of
    `root` only: other Ray clusters on the machine are not counted)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue

    def under(pid: int) -> bool:
        seen = 0
        while pid in parent and seen < 64:
            if pid == root:
                return True
            pid, seen = parent[pid], seen + 1
        return False

    out: dict[str, list[float]] = {}
    for pid in parent:
        if pid == root or not under(pid):
            continue
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ServeReplica:" in title:
            role = title.split("ServeReplica:", 1)[1].split()[0]  # APP:DEPLOYMENT
            mb = _peak_mb(pid)
            if mb is not None:
                out.setdefault(role, []).append(round(mb, 1))
        elif "ServeController" in title or "ProxyActor" in title:
            mb = _peak_mb(pid)
            if mb is not None:
                out.setdefault(title.split()[0].removeprefix("ray::"), []).append(round(mb, 1))
    return out


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the server was not ready within {timeout:.0f} s")
