"""Run the service on uvicorn with graceful draining: on SIGTERM (or Ctrl-C) new requests get 503, the
in-flight ones finish (up to serve.drain_timeout_s), then the process exits 0."""

from __future__ import annotations

import sys
import threading
import time

import uvicorn

from expertrag.serve.app import create_app
from expertrag.serve.service import Service


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        if self.service.draining:  # a second signal: stop now
            self.force_exit = True
            self.should_exit = True
            return
        self.service.draining = True
        threading.Thread(target=self._drain, name="expertrag-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.service.cfg.drain_timeout_s
        while self.service.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.should_exit = True


def run(service: Service, host: str, port: int) -> None:
    app = create_app(service)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=max(1, int(service.cfg.drain_timeout_s)))
    server = DrainingServer(config, service)
    if service.cfg.torch_threads:
        import torch

        torch.set_num_threads(service.cfg.torch_threads)
    service.start()
    print(f"expertrag: serving {service.index_dir} on http://{host}:{port} (loading the model; /readyz says "
          "when it is ready)", file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        service.close()
