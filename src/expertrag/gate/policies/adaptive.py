"""`adaptive`: the learned two-stage gate (a query-only gate, then a query+probe gate where it is unsure)."""

from __future__ import annotations

import numpy as np

from expertrag.errors import ExpertRAGError
from expertrag.gate.features import (
    FeatureSpec,
    popularity_features,
    probe_features,
    sample_features,
    time_sensitive,
)
from expertrag.gate.models import GateArtifactError, GateModel, load_gate
from expertrag.gate.policies.artifacts import TRAIN_HINT, artifact_path, read_band
from expertrag.gate.policies.base import Policy
from expertrag.gate.requirements import spec_signals
from expertrag.gate.types import Decision, GateContext, Probe


def _vectors_for(spec: FeatureSpec, ctx: GateContext, probe: Probe | None) -> dict[str, np.ndarray | None]:
    v: dict[str, np.ndarray | None] = {}
    if spec.use_query_embedding:
        v["query_embedding"] = ctx.query_embedding()
    if spec.use_hidden:
        if probe is None or probe.hidden is None:
            raise ExpertRAGError("the full gate reads the probe's hidden state but the probe returned none; "
                                 "retrain with gate.use_hidden: false")
        v["hidden"] = probe.hidden
    return v


def _scalar_features(ctx: GateContext, with_popularity: bool) -> dict[str, float]:
    f = dict(ctx.query_features())
    if with_popularity:  # only when a gate reads it: a malformed s_pop must not break the others
        f.update(popularity_features(ctx.metadata))
    return f


class AdaptivePolicy(Policy):
    """The learned two-stage gate. Score: P(retrieval needed) from the gate that decided.

    Rule first (time_rule): a time-sensitive question (gate.features.time_sensitive) retrieves, score 1,
    stage "rule": what the model learned may be out of date, so its confidence cannot clear it.
    Stage "fast": the query-only gate scores the question; score < low -> no retrieval, score > high ->
    retrieve. Only scores in [low, high] pay for ctx.probe() (once); the full query+probe gate then
    decides with its own threshold (stage "probe"). The band [low, high] is, in order of precedence:
    the quantile band (threshold -+ the distance that holds `band_quantile` of the fast gate's training
    scores, from band.json), [t - band, t + band] around the fast gate's tuned threshold t, or the fixed
    [low, high].
    """

    name = "adaptive"

    def __init__(self, fast: GateModel, full: GateModel, low: float, high: float, band: float | None = None, *,
                 time_rule: bool = False, time_recent_from: int = 2023, samples: tuple[int, float, int] = (0, 0.7, 0),
                 band_source: str | None = None):
        if band is not None:
            low, high = fast.decision_threshold - band, fast.decision_threshold + band
        if fast.spec.needs_probe:
            raise ExpertRAGError("the fast gate must use query-only features; its spec names probe features")
        if low > high:
            raise ValueError(f"low ({low}) must not exceed high ({high})")
        if full.spec.needs_samples and samples[0] <= 0:
            raise ExpertRAGError("the full gate reads sample-consistency features; set gate.sample_consistency "
                                 "to the N it was trained with")
        self.fast, self.full, self.low, self.high = fast, full, float(low), float(high)
        self.band_source = band_source or ("band" if band is not None else "low/high")
        self.time_rule, self.time_recent_from, self.samples = time_rule, time_recent_from, samples
        self._popularity = any("log_s_pop" in g.spec.names for g in (fast, full))

    def requires(self) -> frozenset[str]:
        # what the two gates were trained with, as recorded in their saved FeatureSpecs
        return frozenset(spec_signals(self.fast.spec) | spec_signals(self.full.spec))

    def hidden_dims(self) -> set[int]:
        """The hidden-state sizes the gates were trained on (checked against the backend's)."""
        return {d for g in (self.fast, self.full) for n, d in g.spec.vectors if n == "hidden"}

    def decide(self, ctx: GateContext) -> Decision:
        if self.time_rule and time_sensitive(ctx.question, self.time_recent_from):
            return Decision(retrieve=True, score=1.0, stage="rule", policy=self.name,
                            features={"time_sensitive": 1.0})
        feats = _scalar_features(ctx, self._popularity)
        s = self.fast.score(self.fast.spec.vectorize(feats, _vectors_for(self.fast.spec, ctx, None)))
        used = {n: feats[n] for n in self.fast.spec.names}
        if s < self.low or s > self.high:
            return Decision(retrieve=s > self.high, score=s, stage="fast", policy=self.name, features=used)
        probe = ctx.probe()
        feats.update(probe_features(probe))
        if self.full.spec.needs_samples:
            feats.update(sample_features(probe.text, ctx.samples(*self.samples)))
        s2 = self.full.score(self.full.spec.vectorize(feats, _vectors_for(self.full.spec, ctx, probe)))
        used = {n: feats[n] for n in self.full.spec.names} | {"fast_score": s}
        return Decision(retrieve=self.full.decide(s2), score=s2, stage="probe", policy=self.name, features=used)

    @classmethod
    def from_config(cls, config, artifacts_dir):
        fast_path = artifact_path(artifacts_dir, "fast", cls.name)
        fast, full = load_gate(fast_path), load_gate(artifact_path(artifacts_dir, "full", cls.name))
        if fast.spec.needs_probe:  # a gate folder that does not fit this policy: an artifact problem
            raise GateArtifactError(f"{fast_path}: the fast gate must use query-only features; its spec names "
                                    f"probe features; {TRAIN_HINT}")
        kw = {"time_rule": config.time_rule, "time_recent_from": config.time_recent_from,
              "samples": (config.sample_consistency, config.sample_temperature, config.sample_seed)}
        band = read_band(artifacts_dir, config.band_quantile) if config.band_quantile is not None else None
        if band is not None:
            return cls(fast, full, band[0], band[1], None, band_source=f"quantile {config.band_quantile:g}", **kw)
        return cls(fast, full, config.low, config.high, config.band, **kw)
