"""The `eval:` config section: what `expertrag eval` and `expertrag bench pipeline` run and report."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EvalConfig(BaseModel):
    """End-to-end evaluation of retrieval policies. Owned by eval/; command-line options override it."""

    model_config = ConfigDict(extra="forbid")

    policies: list[str] = Field(default_factory=lambda: ["never", "always", "adaptive"],
                                description="policies evaluated side by side (names from gate.policies.POLICIES)")
    k_sweep: list[int] = Field(default_factory=lambda: [1, 3, 5, 10, 20],
                               description="context dilution: `always` is re-run with pipeline.k = each; [] skips")
    limit: int | None = Field(None, gt=0, description="questions per dataset, sampled by `seed` (null = all, file order)")
    seed: int = Field(0, description="seed for question sampling and the workload")
    warmup: int = Field(1, ge=0, description="untimed answers per policy before measuring (lazy loads, allocator)")
    interleave: bool = Field(
        True, description="answer each question with every policy in turn (rotating the order), so load on a "
                          "shared machine hits all policies alike; false runs policy after policy")
    both_wrong_as: Literal["retrieve", "no_retrieve", "drop"] = Field(
        "retrieve", description="gate-quality target of both_wrong questions (retrieve: need = not closed_correct)")
    sweep_points: int = Field(101, ge=3, description="most thresholds in a policy's threshold sweep")
    reliability_bins: int = Field(10, ge=2, description="equal-width score bins of the gate reliability diagram")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples of the questions for the 95% intervals of "
                                                   "gate figures (AUROC, matching rate); 0 = none")
    bootstrap_seed: int = Field(0, description="seed of the bootstrap resampling")
    adaptive_policy: str = Field("adaptive", description="the policy whose speed-up over `always` is reported")
    collapse_dominant_above: float = Field(0.5, gt=0, le=1,
                                           description="expert token share above which a layer is flagged dominant")
    workload_size: int = Field(200, gt=1, description="questions in the mixed workload of `bench pipeline`")
    workload_retrieve_fraction: float = Field(0.5, gt=0, lt=1,
                                              description="share of the workload that needs retrieval")
    workload_fallback_both_wrong: bool = Field(
        True, description="fill the needs-retrieval half with both_wrong questions when too few are labelled retrieve")
    workload_keep_balance: bool = Field(
        True, description="when one half is short, shrink the other so the mix keeps its ratio")
