"""Which generator signals a policy reads, checked against a backend's `Capabilities` at start-up.

A policy that needs a signal the backend lacks (hidden states over HTTP, router statistics on a dense
model, full-distribution entropies from a server that returns top-k log-probs) fails when the pipeline is
built, naming the policy and the backend, instead of mid-answer or, worse, on made-up values. The learned
gate's needs are the features recorded in its saved FeatureSpec (what it was trained with).

Signals: logprobs, entropy (full distribution), entropy_approx (full or top-k approximation), hidden,
router_entropy, router_agreement, retrieval_affinity.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from expertrag.errors import InputError
from expertrag.gate.features import FeatureSpec
from expertrag.model.backend import Capabilities

log = logging.getLogger(__name__)

FEATURE_SIGNALS: dict[str, str] = {
    "first_token_entropy": "entropy", "mean_token_entropy": "entropy", "max_token_entropy": "entropy",
    "min_logprob": "logprobs", "mean_logprob": "logprobs", "draft_tokens": "logprobs",
    "retrieval_affinity": "retrieval_affinity", "router_entropy": "router_entropy",
    "router_agreement": "router_agreement",
    "q_retrieval_affinity": "retrieval_affinity", "q_router_entropy": "router_entropy",
    "q_router_agreement": "router_agreement",
}
_WHY = {
    "entropy": "entropies of the full next-token distribution",
    "entropy_approx": "per-token entropies",
    "logprobs": "per-token log-probabilities",
    "hidden": "the probe's hidden state",
    "router_entropy": "MoE router statistics",
    "router_agreement": "MoE router statistics",
    "retrieval_affinity": "a retrieval expert's router affinity",
}


class BackendCapabilityError(InputError):
    """A policy needs a signal the configured generator backend cannot give (an InputError: a request
    that names such a policy gets it as its answer's error, the others go on)."""


def spec_signals(spec: FeatureSpec) -> set[str]:
    """The signals a learned gate with this FeatureSpec reads."""
    out = {FEATURE_SIGNALS[n] for n in spec.names if n in FEATURE_SIGNALS}
    if spec.use_hidden:
        out.add("hidden")
    return out


def missing_signals(needs: Iterable[str], caps: Capabilities) -> list[str]:
    have = caps.signals()
    return sorted(set(needs) - have)


def check_policy(policy: Any, caps: Capabilities, name: str | None = None) -> None:
    """Raise BackendCapabilityError when `policy.requires()` names a signal `caps` lacks; log a warning
    when it reads entropies the backend only approximates."""
    requires = getattr(policy, "requires", None)
    needs = set(requires()) if callable(requires) else set()
    name = name or getattr(policy, "name", type(policy).__name__)
    lacking = missing_signals(needs, caps)
    if lacking:
        what = "; ".join(dict.fromkeys(_WHY.get(s, s) for s in lacking))
        hint = ""
        if name == "adaptive":
            hint = " (the learned gate records the features it was trained with: retrain it on this backend" + \
                   (", e.g. with gate.use_hidden: false)" if "hidden" in lacking else ")")
        raise BackendCapabilityError(
            f"policy '{name}' needs {what}, which backend '{caps.backend}' ({caps.model}) cannot give{hint}; "
            "pick another policy or backend")
    dims = getattr(policy, "hidden_dims", None)
    wrong = sorted(d for d in (dims() if callable(dims) else ()) if d and caps.hidden_size and d % caps.hidden_size)
    if wrong:
        raise BackendCapabilityError(
            f"policy '{name}' was trained on {wrong[0]}-dim hidden states; backend '{caps.backend}' ({caps.model}) "
            f"gives {caps.hidden_size}: retrain the gate on this backend, or with gate.use_hidden: false")
    if "entropy_approx" in needs and caps.entropy == "top_k":
        log.warning("policy '%s' on backend '%s' reads entropies approximated from the top-k log-probs the "
                    "server returns (a lower bound of the full-distribution entropy it was tuned on)", name,
                    caps.backend)
