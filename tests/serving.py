"""Helpers for the service tests: a small index, keys, and a real `expertrag serve` process on a free
127.0.0.1 port (stopped by the test that started it)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

DOCS = [
    {"id": "paris", "title": "Paris", "contents": "Paris is the capital and largest city of France, on the Seine."},
    {"id": "zorbl", "title": "Zorblatt Institute",
     "contents": "The Zorblatt Institute was founded in 1987 by Mirela Quenton in Tallinn."},
    {"id": "falcon", "title": "Project Falcon", "contents": "Project Falcon's launch code word is BLUEBIRD.",
     "metadata": {"groups": ["staff"]}},
    {"id": "payroll", "title": "Payroll", "contents": "Payroll runs on the 25th; the payroll code word is MAPLE.",
     "metadata": {"groups": ["hr"]}},
    {"id": "everest", "title": "Mount Everest",
     "contents": "Mount Everest is Earth's highest mountain above sea level, in the Himalayas."},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "expertrag", *args], capture_output=True, text=True,
                          timeout=600, env=_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"expertrag {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def build_index(directory: Path, docs: list[dict] = DOCS) -> Path:
    """The index the service tests serve, built in this process with the package defaults (`expertrag index`
    itself is tested in test_index_cli; a subprocess per module only paid Python's and torch's start-up)."""
    from expertrag.config import ExpertRAGConfig
    from expertrag.data.readers import iter_documents
    from expertrag.retrieval.builder import build_index as build

    corpus = directory / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    index = directory / "index"
    config = ExpertRAGConfig.load(None)  # what `expertrag index` without --config builds with
    build(index, iter_documents([corpus], config=config.chunking), retrieval=config.retrieval,
          chunking=config.chunking, sources=[str(corpus)], progress=False)
    return index


def add_key(index: Path, name: str, groups: list[str] = (), admin: bool = False, *, via_cli: bool = False) -> str:
    """A new key of the index's service. In this process (the service reads the same keys file) unless
    `via_cli`: test_serve adds its keys with `expertrag keys add`, which that keeps tested, while the
    other modules' dozens of keys need no process each."""
    if not via_cli:
        from expertrag.serve.keys import KeyStore, keys_path

        return KeyStore(keys_path(index)).add(name, list(groups), admin=admin)
    args = ["keys", "add", "--index", str(index), "--name", name, "--groups", ",".join(groups), "--json"]
    out = cli(*args, *(["--admin"] if admin else [])).stdout.strip().splitlines()[-1]
    return json.loads(out)["key"]


class Server:
    """`expertrag serve` in a subprocess; `url`, `client(key)`; `stop()` sends SIGTERM and waits."""

    def __init__(self, index: Path, config: dict, log: Path):
        self.index, self.port = index, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg_path = log.with_suffix(".yaml")
        base = {"serve": {"torch_threads": 1}}
        merged = {**base, **config, "serve": {**base["serve"], **config.get("serve", {})}}
        cfg_path.write_text(yaml.safe_dump(merged), encoding="utf-8")
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "expertrag", "serve", "--index", str(index), "--config", str(cfg_path),
             "--port", str(self.port)], stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=_env())
        self.wait_ready()

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server not ready in {timeout} s: {self.log.read_text()[-3000:]}")

    def client(self, key: str | None = None, timeout: float = 300) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"server did not exit within {timeout} s of signal {sig}") from None
        return self.proc.returncode


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """Parse a Server-Sent Events body as a client would: blocks split by blank lines."""
    events = []
    event, data = "message", []
    for line in response.iter_lines():
        if line == "":
            if data:
                events.append((event, json.loads("\n".join(data))))
            event, data = "message", []
        elif line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
    if data:
        events.append((event, json.loads("\n".join(data))))
    return events
