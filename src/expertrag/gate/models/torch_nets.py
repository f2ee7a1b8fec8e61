"""The torch side of the learned gates: the nets they train and the thread setting they train under.

Training uses `torch.optim.Adam` (L2 weight decay). It replaced a hand-written Adam that existed because
constructing torch.optim.Adam imports torch._dynamo; measured on torch 2.13 (2 shared cores) that costs
about 1.1 s once per process, small next to a gate-training run, so the library optimiser is used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal


@contextmanager
def torch_single_thread() -> Iterator[None]:
    """Run a block with one intra-op torch thread, restoring the setting after. Gate nets are tiny: on a
    busy machine, waking a thread pool for each small op costs far more than the op (measured 25x slower
    on 2 shared cores)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def make_torch_net(kind: Literal["logistic", "mlp"], dim: int, hidden: int = 32, seed: int = 0) -> Any:
    """A float64 torch module producing one log-odds per row (Linear, or Linear-Tanh-Linear), initialised
    deterministically from `seed` without touching the global RNG."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "logistic":
            net = torch.nn.Linear(dim, 1)
            torch.nn.init.zeros_(net.weight)
            torch.nn.init.zeros_(net.bias)
        elif kind == "mlp":
            net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
        else:
            raise ValueError(f"unknown torch gate kind {kind!r}")
    return net.double()
