"""What `ExpertRAG.answer` returns: the answer and everything needed to trust or audit it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class User:
    """Who asks: retrieval only returns public passages and passages of these access groups.

    all_groups=True is the administrator switch: every passage, whatever its groups. No user at all
    (`ExpertRAG.answer(q, user=None)`) is an anonymous caller: public passages only."""

    name: str
    groups: tuple[str, ...] = ()
    all_groups: bool = False


@dataclass
class Citation:
    id: str
    title: str
    marker: int  # the [n] the answer uses for it
    expert: str | None = None  # the domain expert whose passage it is (None: no expert routing)


@dataclass
class Timings:
    """Where one answer's time went. The five parts partition the total: gate + probe + retrieval +
    generation + other == total (other: validation, cache look-ups, citations)."""

    gate_ms: float = 0.0  # policy decision and domain-expert routing, without the closed-book probe
    probe_ms: float = 0.0  # closed-book draft; reused as the answer's start when not retrieving
    retrieval_ms: float = 0.0
    generation_ms: float = 0.0  # generation after the gate (the probe's continuation counts here, not the draft)
    other_ms: float = 0.0
    total_ms: float = 0.0
    cache: str = "miss"  # "answer" when served from the answer cache, "retrieval" when hits were cached

    def parts_ms(self) -> float:
        return self.gate_ms + self.probe_ms + self.retrieval_ms + self.generation_ms


@dataclass
class Answer:
    question: str
    text: str
    retrieved: bool
    citations: list[Citation] = field(default_factory=list)
    confidence: float = 0.0
    abstained: bool = False
    gate: dict[str, Any] = field(default_factory=dict)  # decision, score, stage, policy, features
    timings: Timings = field(default_factory=Timings)
    tokens: dict[str, int] = field(default_factory=lambda: {"prompt": 0, "generated": 0})
    experts: dict[str, Any] = field(default_factory=dict)
    passages: list[dict[str, Any]] = field(default_factory=list)  # what was retrieved (id, title, contents, score)
    generated: str = ""  # the model's own words, before abstention replaced them
    token_ids: list[int] = field(default_factory=list)  # the generated tokens (the draft's included)
    logprobs: list[float] = field(default_factory=list)  # log p of each of those tokens (serve's `logprobs`)
    # domain-expert routing (experts/): experts chosen, weights, the layer that settled, why, and what each
    # contributed. Empty when the index has no domain experts. (`experts` above is MoE token usage.)
    routing: dict[str, Any] = field(default_factory=dict)
    # the policy expert's verdict (experts/policy.py): a flagged question is marked for a human to review,
    # and `policy` says which rules matched, the action taken and why ({} when nothing matched)
    needs_review: bool = False
    policy: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Answer:
        d = dict(d)
        d["citations"] = [Citation(**c) for c in d.get("citations", [])]
        d["timings"] = Timings(**d.get("timings", {}))
        return cls(**d)
