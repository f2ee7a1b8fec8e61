"""The `policy:` config section: which queries the policy expert treats as sensitive, and what it does.

Empty by default (no rules = the pipeline never screens, behaviour unchanged). configs/policy.yaml is a
worked example. Two kinds of rule, each with one action:

- personal_data: a built-in detector (email, phone, ssn, credit_card, iban, ip_address; the number ones
  validate what they match: Luhn, mod-97, SSN ranges) or an operator's regex, with the placeholder its
  matches are replaced by when redacting ([EMAIL], ...).
- topics: a regulated topic (medical dosing, legal advice, ...) caught by phrases (case-insensitive, whole
  words), regexes, and the classifier trained on its `examples` against `classifier.ordinary` questions.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Action = Literal["refuse", "redact", "cite_only"]
# what a question routed to a `sensitive: true` expert gets: "review" answers as usual but marks the answer
# for review and audits it; cite_only and refuse as for the rules
ExpertAction = Literal["review", "cite_only", "refuse"]
DETECTORS = ("email", "phone", "ssn", "credit_card", "iban", "ip_address")
# severity order when several rules match one query: the strictest action wins
ACTION_RANK: dict[str, int] = {"redact": 0, "review": 0, "cite_only": 1, "refuse": 2}


def _check_regex(pattern: str, where: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where}: not a valid regular expression ({e}): {pattern!r}") from None
    return pattern


class PersonalDataRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(..., min_length=1)
    detector: Literal["email", "phone", "ssn", "credit_card", "iban", "ip_address"] | None = None
    pattern: str | None = Field(None, description="regex of the operator's own identifier (instead of a detector)")
    placeholder: str | None = Field(None, description="what a match becomes when redacting (default [DETECTOR])")
    action: Action = "redact"
    reason: str = "the question contains personal data"

    @model_validator(mode="after")
    def _one_source(self) -> PersonalDataRule:
        if (self.detector is None) == (self.pattern is None):
            raise ValueError(f"personal_data rule {self.id!r}: give exactly one of `detector` or `pattern`")
        if self.pattern is not None:
            _check_regex(self.pattern, f"personal_data rule {self.id!r}, field 'pattern'")
            if self.placeholder is None:
                raise ValueError(f"personal_data rule {self.id!r}: a `pattern` rule needs a `placeholder`")
        return self

    @property
    def token(self) -> str:
        return self.placeholder or f"[{(self.detector or self.id).upper()}]"


class TopicRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(..., min_length=1)
    action: Literal["refuse", "cite_only"] = "cite_only"  # a topic has nothing to redact
    reason: str = Field(..., min_length=1)
    phrases: list[str] = Field(default_factory=list, description="case-insensitive whole-word phrases")
    patterns: list[str] = Field(default_factory=list, description="regexes (case-insensitive)")
    examples: list[str] = Field(default_factory=list, description="example questions of this topic, for the classifier")

    @field_validator("patterns")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        return [_check_regex(p, "topic rule field 'patterns'") for p in v]

    @model_validator(mode="after")
    def _something(self) -> TopicRule:
        if not (self.phrases or self.patterns or self.examples):
            raise ValueError(f"topic rule {self.id!r}: needs phrases, patterns or examples")
        return self


class ClassifierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    ordinary: list[str] = Field(default_factory=list, description="ordinary (non-sensitive) example questions")
    examples_file: str | None = Field(
        None, description="JSONL of {text, topic} (topic null or 'ordinary' for ordinary questions), "
                          "added to the examples in this config; a relative path is from the working directory")
    threshold: float = Field(0.7, gt=0, lt=1, description="probability of a topic at which the classifier flags it")
    similarity_threshold: float = Field(
        0.75, gt=0, le=1, description="without ordinary examples: cosine to a topic example that flags it")
    c: float = Field(1.0, gt=0, description="inverse regularisation of the logistic regression")


class SensitiveExpertsConfig(BaseModel):
    """Experts flagged `sensitive: true` go through the policy expert whatever the rules found in the
    question itself: routing to one is a match of its own (rule `sensitive-expert:NAME`)."""

    model_config = ConfigDict(extra="forbid")
    action: ExpertAction = Field("cite_only", description="review | cite_only | refuse")
    reason: str = Field("the question was routed to a sensitive expert", min_length=1)


class PolicyConfig(BaseModel):
    """Rules of the policy expert; none configured = no screening at all."""

    model_config = ConfigDict(extra="forbid")
    personal_data: list[PersonalDataRule] = Field(default_factory=list)
    topics: list[TopicRule] = Field(default_factory=list)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    audit_path: str | None = Field(None, description="audit log (JSON lines); default INDEX/audit.jsonl")
    refusal_text: str = "I can't help with that request."
    sensitive_experts: SensitiveExpertsConfig = Field(default_factory=SensitiveExpertsConfig)

    @model_validator(mode="after")
    def _unique_ids(self) -> PolicyConfig:
        seen: set[str] = set()
        for r in [*self.personal_data, *self.topics]:
            if r.id in seen:
                raise ValueError(f"policy rule id {r.id!r} is used twice")
            seen.add(r.id)
        return self

    @property
    def active(self) -> bool:
        """Any rule on the questions themselves? (Sensitive experts are screened whatever this says.)"""
        return bool(self.personal_data or self.topics)
