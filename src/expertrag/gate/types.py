"""Types at the seam between the pipeline and the retrieval gate.

The pipeline owns a `GateContext` per question: it computes features lazily and at most once, so a
policy that needs only query-only features never pays for the closed-book probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

Stage = Literal["fixed", "fast", "probe", "metadata", "policy", "rule"]  # policy: the policy expert decided; rule: a gate rule (time cue)


@dataclass
class Probe:
    """A short closed-book draft of the answer and what the model revealed while writing it.

    logprobs/entropies: one per drafted token (entropy of the full next-token distribution, nats).
    hidden: the prompt's last-token hidden state at the probe layer(s) (pipeline.probe_layers: several
    layers are concatenated in that order), or None.
    retrieval_affinity: the retrieval expert's router probability averaged over the tokens the backend's
    `RouterStats` counts (RouterStats.span), then over the MoE layers with a retrieval expert; None for a
    model without one. On the native backend that is every token of the probe's prompt forward (chat
    template and system prompt included); on the transformers backend the question's tokens.
    router_entropy: the router's entropy averaged the same way, or None for a dense model.
    router_agreement: share of consecutive MoE layers whose top-1 expert agrees, over the same tokens.
    question_router: the same three statistics ({retrieval_affinity, router_entropy, router_agreement})
    over the question's own tokens only, or None where the backend cannot separate them (gate features
    q_retrieval_affinity, q_router_entropy, q_router_agreement).
    draft: the generator's `Generation` of this draft (its `.state` holds the KV cache and tokens); a
    "no retrieval" answer continues from it instead of starting again.
    """

    text: str
    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    hidden: np.ndarray | None = None
    retrieval_affinity: float | None = None
    router_entropy: float | None = None
    router_agreement: float | None = None
    question_router: dict[str, float | None] | None = None
    draft: Any = None
    ms: float = 0.0


@dataclass
class Decision:
    retrieve: bool
    score: float  # estimated probability that retrieval is needed (policy-specific scale for baselines)
    stage: Stage
    policy: str
    features: dict[str, float] = field(default_factory=dict)


class GateContext(Protocol):
    """What a policy may ask about one question. Implementations cache every answer."""

    question: str
    metadata: dict[str, Any]

    def query_features(self) -> dict[str, float]:
        """Cheap, query-only features (no generation): see gate.features.query_features."""

    def query_embedding(self) -> np.ndarray:
        """The question's normalised sentence embedding."""

    def probe(self) -> Probe:
        """Run (once) the closed-book draft."""

    def samples(self, n: int, temperature: float, seed: int) -> list[str]:
        """(Once) n short sampled closed-book drafts, seeded (only gates with sample features ask)."""
