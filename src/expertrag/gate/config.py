"""The `gate:` config section: which policy decides retrieval, and how its gates are trained."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PolicyName = Literal["never", "always", "popularity", "skr-knn", "entropy", "flare", "adaptive", "router"]


class GateConfig(BaseModel):
    """Retrieval gate: policy choice, learned-gate training, baseline thresholds. Owned by gate/."""

    model_config = ConfigDict(extra="forbid")

    # --- which policy runs
    policy: PolicyName = Field("adaptive", description="retrieval policy used at answer time")

    # --- the learned (adaptive) gate
    model: Literal["logistic", "mlp"] = Field(
        "logistic", description="model of the learned gates (fast query-only and full query+probe)")
    objective: Literal["supervised", "gumbel", "reinforce"] = Field(
        "supervised",
        description="supervised: classify labels; gumbel/reinforce: end-to-end reward = correctness of the "
                    "chosen branch - retrieval_cost * retrieve, with a target-rate regulariser")
    low: float = Field(0.2, ge=0, le=1, description="fast-gate score below this: answer without retrieval")
    high: float = Field(0.8, ge=0, le=1, description="fast-gate score above this: retrieve; in between: probe")
    band: float | None = Field(
        None, ge=0, le=1,
        description="when set, the fast stage's uncertain band is its own tuned threshold +- band instead of "
                    "[low, high]: the band follows the operating point (e.g. fit_target_rate)")
    band_quantile: float | None = Field(
        0.3, gt=0, le=1,
        description="the fast stage's uncertain band as a share of the training questions: the band_quantile "
                    "of fast-gate training scores nearest its threshold are probed (read from the gate "
                    "folder's band.json). Takes precedence over band/[low, high]; null, or a gate folder "
                    "without band.json (trained before it existed), uses the absolute band")
    threshold: float | None = Field(
        None, ge=0, le=1,
        description="decision threshold of the full gate on its calibrated score; null = tuned on the "
                    "calibration split (max F1 of 'retrieve', or fit_target_rate when set)")
    fit_target_rate: float | None = Field(
        0.6, ge=0, le=1,
        description="tune the decision threshold to this retrieval rate; null = max F1 of 'retrieve'. 0.6: the "
                    "issue-14 operating point (on the shared test split as accurate as always-retrieve at "
                    "64.5% of its retrievals; RESULTS.md, 'Gate ablation on the full labels')")
    use_query_embedding: bool = Field(True, description="feed the question embedding to the learned gates")
    use_hidden: bool = Field(False, description="feed the probe's hidden state to the full (query+probe) gate "
                                                "(the layers: pipeline.probe_layers)")
    # --- feature groups, each switchable (one ablation row each)
    retrieval_evidence: bool = Field(
        True, description="both gates read retrieval-side evidence (gate.features.RETRIEVAL_FEATURES: score "
                           "distribution, sparse/dense agreement, query-term idf, entity in the corpus)")
    time_features: bool = Field(True, description="both gates read the time-sensitivity cue (time_sensitive)")
    time_rule: bool = Field(
        True, description="the adaptive policy retrieves for every time-sensitive question (current, latest, "
                          "now, this year, a year >= time_recent_from) whatever its score (stage 'rule')")
    time_recent_from: int = Field(2023, description="a year from this one on makes a question time-sensitive")
    sample_consistency: int = Field(
        0, ge=0, description="N > 0: the full gate reads the agreement of N sampled probe drafts with the "
                             "greedy one (gate.features.SAMPLE_FEATURES); costs N sampled drafts per probed "
                             "question (one batch of N on a batching backend)")
    sample_temperature: float = Field(0.7, gt=0, description="temperature of the sampled drafts")
    sample_seed: int = Field(0, description="seed of the sampled drafts")
    router_span: Literal["prompt", "question", "both"] = Field(
        "prompt", description="router statistics the full gate reads: over the whole probe prompt "
                              "(retrieval_affinity, router_entropy, router_agreement; template included, as "
                              "the router policy was tuned), the question's tokens only (q_*), or both")
    class_weight: Literal["balanced", "none"] = Field(
        "balanced", description="re-weight classes inversely to their frequency in supervised training")
    logistic_c: float = Field(
        0.05, gt=0,
        description="inverse L2 strength of the logistic gate. 0.05: ablation row k against 1.0 (row h) on the "
                    "shared dev split, AUROC 0.727 vs 0.707; ~400 features for a few hundred known questions "
                    "fit the training split almost perfectly at 1.0")
    mlp_hidden: int = Field(32, gt=0, description="hidden units of the MLP gate (one tanh layer)")
    mlp_epochs: int = Field(300, gt=0, description="full-batch Adam steps of supervised MLP training")
    learning_rate: float = Field(0.01, gt=0, description="Adam learning rate (MLP and end-to-end training)")
    weight_decay: float = Field(1e-4, ge=0, description="Adam weight decay (MLP and end-to-end training)")
    calibration: Literal["platt", "isotonic", "none"] = Field(
        "platt", description="post-hoc calibration fitted on the held-out calibration split")
    calibration_fraction: float = Field(0.2, ge=0, lt=1, description="share of labelled questions held out for calibration")
    validation_fraction: float = Field(0.2, ge=0, lt=1, description="share held out for the reported metrics")
    both_wrong_as: Literal["retrieve", "no_retrieve", "drop"] = Field(
        "retrieve",
        description="training target for questions neither branch answers. retrieve (default): the gate "
                    "estimates whether the model already knows the answer, and it does not; no_retrieve: "
                    "retrieval does not change correctness there, so take the cheaper branch; drop: leave out")
    seed: int = Field(0, description="seed for splits, initialisation and sampling (training is deterministic)")

    # --- end-to-end (gumbel / reinforce) training
    retrieval_cost: float = Field(0.1, ge=0, description="lambda: reward subtracted per retrieval")
    target_rate: float = Field(0.5, ge=0, le=1, description="retrieval rate the regulariser pulls toward")
    rate_weight: float = Field(0.1, ge=0, description="mu: weight of (mean p - target_rate)^2; 0 disables")
    e2e_epochs: int = Field(200, gt=0, description="passes over the training split")
    batch_size: int = Field(64, gt=0, description="mini-batch size of end-to-end training")
    gumbel_tau_start: float = Field(1.0, gt=0, description="Gumbel-sigmoid temperature at the first epoch")
    gumbel_tau_end: float = Field(0.1, gt=0, description="temperature at the last epoch (geometric annealing)")
    baseline_momentum: float = Field(0.9, ge=0, lt=1, description="REINFORCE moving-average reward baseline")

    # --- baselines
    popularity_threshold: float | None = Field(
        None, ge=0, description="fixed s_pop threshold for every relation; null = per-relation thresholds "
                                "tuned by `expertrag train gate`")
    popularity_min_questions: int = Field(
        10, gt=0, description="relations with fewer training questions use the global threshold")
    popularity_missing: Literal["retrieve", "no_retrieve"] = Field(
        "retrieve", description="popularity policy's decision for a question without metadata.s_pop "
                                "(unknown popularity is treated like the long tail)")
    skr_k: int = Field(5, gt=0, description="neighbours of the skr-knn vote (odd avoids ties; ties do not retrieve)")
    entropy_threshold: float | None = Field(
        None, ge=0, description="retrieve when the draft's mean token entropy (nats) >= this; null = tuned")
    flare_threshold: float = Field(0.2, gt=0, lt=1, description="FLARE theta: retrieve if any draft token prob < theta")
    router_threshold: float | None = Field(
        None, ge=0, le=1, description="retrieve when retrieval-expert affinity >= this; null = tuned")

    @model_validator(mode="after")
    def _check(self) -> GateConfig:
        if self.low > self.high:
            raise ValueError(f"gate.low ({self.low}) must not exceed gate.high ({self.high})")
        if self.calibration_fraction + self.validation_fraction >= 0.9:
            raise ValueError("gate.calibration_fraction + gate.validation_fraction must leave >= 10% for training")
        return self
