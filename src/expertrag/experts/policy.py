"""The policy expert: screens every question before the gate sees it (`PolicyExpert.screen`).

Personal data is found by detectors (regexes whose matches are validated: Luhn for card numbers, mod-97
for IBANs, the SSA's ranges for SSNs, a digit count for phone numbers) and the operator's own regexes, and is
always replaced by typed placeholders ([EMAIL], ...) in the text handed on: from then on the retriever, the
embedder, the model, the caches and the audit log only ever see the redacted question. Regulated topics are
found by phrase and regex rules and by a classifier on MiniLM embeddings of the redacted question (logistic
regression on the operator's topic examples against ordinary examples, or cosine similarity to the topic
examples when no ordinary examples are given).

Each matched rule has an action; several matches take the strictest (refuse > cite_only > redact). The
pipeline refuses, answers normally from the redacted question, or answers only with citations.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from expertrag.errors import InputError
from expertrag.experts.audit import AuditLog
from expertrag.experts.policy_config import ACTION_RANK, PersonalDataRule, PolicyConfig, TopicRule

# ---------------------------------------------------------------------------------------- detectors


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    s = re.sub(r"\s", "", text).upper()
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


def _card_ok(m: str) -> bool:
    d = _digits(m)
    return 13 <= len(d) <= 19 and luhn_ok(d) and len(set(d)) > 1  # 0000 0000 0000 0000 passes Luhn


def _phone_ok(m: str) -> bool:
    d = _digits(m)
    # 9-15 digits (E.164 allows 15); a bare run without any separator or + must be 10+ to be a number
    # someone dials rather than a count ("123456789 people")
    if not 9 <= len(d) <= 15:
        return False
    return len(d) >= 10 or bool(re.search(r"[\s().+-]", m))


# name -> (regex, validator of a match or None). Word boundaries keep digits inside longer tokens out.
DETECTOR_PATTERNS: dict[str, tuple[re.Pattern[str], Callable[[str], bool] | None]] = {
    "email": (re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), None),
    # upper case only: with re.I the greedy run would swallow the next word ("... 00 tomorrow") and fail mod-97
    "iban": (re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"), iban_ok),
    "credit_card": (re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])"), _card_ok),
    "ssn": (re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}[- ](?!00)\d{2}[- ](?!0000)\d{4}(?![\d-])"), None),
    "ip_address": (re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                              r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])"), None),
    "phone": (re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}(?!\w)"),
              _phone_ok),
}


def _phrase_regex(phrases: Sequence[str]) -> re.Pattern[str] | None:
    if not phrases:
        return None
    # whole words, case-insensitive, any run of spaces between a phrase's words
    alts = sorted({r"\s+".join(re.escape(w) for w in p.split()) for p in phrases if p.strip()}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(alts) + r")(?!\w)", re.I) if alts else None


# ------------------------------------------------------------------------------------------ results


@dataclass
class Match:
    rule: str
    kind: str  # "personal_data" | "topic" | "expert" (routed to a sensitive expert)
    action: str
    reason: str
    by: str  # "detector" | "pattern" | "phrase" | "classifier" | "routing"
    score: float | None = None  # the classifier's probability (or cosine), for classifier matches
    count: int = 1  # personal-data spans this rule replaced

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "kind": self.kind, "action": self.action, "by": self.by,
                "score": None if self.score is None else round(float(self.score), 4), "count": self.count}


@dataclass
class Screening:
    """What the policy expert decided about one question. `text` is the only form of the question the
    rest of the pipeline may use (personal data replaced); the original is not kept here."""

    text: str
    matches: list[Match] = field(default_factory=list)
    embedding: np.ndarray | None = None  # of `text`, when the classifier computed it (the gate reuses it)
    query_hash: str | None = None  # keyed hash of the original question (audit.py), when flagged

    @property
    def flagged(self) -> bool:
        return bool(self.matches)

    @property
    def action(self) -> str | None:
        if not self.matches:
            return None
        return max((m.action for m in self.matches), key=ACTION_RANK.__getitem__)

    @property
    def reason(self) -> str:
        deciding = [m for m in self.matches if m.action == self.action]
        return "; ".join(dict.fromkeys(m.reason for m in deciding))

    @property
    def redacted(self) -> bool:
        return any(m.kind == "personal_data" for m in self.matches)

    def to_dict(self) -> dict[str, Any]:
        """The Answer's `policy` field."""
        if not self.matches:
            return {}
        return {"rules": list(dict.fromkeys(m.rule for m in self.matches)), "action": self.action,
                "reason": self.reason, "redacted": self.redacted, "matches": [m.to_dict() for m in self.matches]}


class TextEmbedder(Protocol):
    def encode(self, texts: list[str]) -> np.ndarray: ...


# ------------------------------------------------------------------------------------------ expert


class TopicClassifier:
    """P(topic | question) from normalised sentence embeddings.

    With ordinary examples: multinomial logistic regression over {ordinary, topic...}, class-balanced (the
    operator lists a handful per topic). Without: the best cosine to any example of each topic."""

    def __init__(self, topics: Sequence[str], vectors: np.ndarray, labels: Sequence[str], *, c: float,
                 threshold: float, similarity_threshold: float):
        self.topics = list(topics)
        self.labels = np.asarray(labels)
        self.vectors = vectors
        self.threshold = threshold
        self.similarity_threshold = similarity_threshold
        self.model = None
        if (self.labels == ORDINARY).any():
            from sklearn.linear_model import LogisticRegression

            self.model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
            self.model.fit(vectors, self.labels)

    def scores(self, vectors: np.ndarray) -> list[dict[str, float]]:
        """Per question, topic -> score (probability, or cosine without ordinary examples)."""
        if self.model is not None:
            proba = self.model.predict_proba(vectors)
            cols = {c: i for i, c in enumerate(self.model.classes_)}
            return [{t: float(p[cols[t]]) for t in self.topics if t in cols} for p in proba]
        sims = vectors @ self.vectors.T
        return [{t: float(row[self.labels == t].max()) for t in self.topics if (self.labels == t).any()}
                for row in sims]

    def flagged(self, vectors: np.ndarray) -> list[dict[str, float]]:
        cut = self.threshold if self.model is not None else self.similarity_threshold
        return [{t: s for t, s in row.items() if s >= cut} for row in self.scores(vectors)]


ORDINARY = "__ordinary__"


def read_examples(path: str | Path) -> list[tuple[str, str]]:
    """(text, topic or ORDINARY) from a JSONL file of {"text": ..., "topic": ... | null | "ordinary"}."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError("policy examples file not found", path=path) from None
    out = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InputError(f"not JSON ({e.msg})", path=path, line=n) from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise InputError("needs a non-empty string", path=path, line=n, field="text")
        topic = row.get("topic")
        if topic is not None and not isinstance(topic, str):
            raise InputError("must be a string or null", path=path, line=n, field="topic")
        out.append((row["text"], ORDINARY if topic in (None, "", "ordinary") else topic))
    return out


class PolicyExpert:
    """Screens questions against `PolicyConfig`; writes an audit entry for every flagged one."""

    def __init__(self, config: PolicyConfig, embedder: TextEmbedder | None = None, *,
                 audit: AuditLog | None = None, base_dir: str | Path | None = None):
        self.config = config
        self.embedder = embedder
        self.audit = audit
        self._pii: list[tuple[PersonalDataRule, re.Pattern[str], Callable[[str], bool] | None]] = []
        for r in config.personal_data:
            if r.detector is not None:
                pattern, check = DETECTOR_PATTERNS[r.detector]
                self._pii.append((r, pattern, check))
            else:
                self._pii.append((r, re.compile(r.pattern or ""), None))
        self._topics: list[tuple[TopicRule, re.Pattern[str] | None, list[re.Pattern[str]]]] = [
            (t, _phrase_regex(t.phrases), [re.compile(p, re.I) for p in t.patterns]) for t in config.topics]
        self.classifier = self._fit_classifier(base_dir)

    @classmethod
    def from_config(cls, config: PolicyConfig, embedder: TextEmbedder | None, *,
                    audit_path: str | Path | None, base_dir: str | Path | None = None) -> PolicyExpert | None:
        """None when no rule is configured: the pipeline then never screens."""
        if not config.active:
            return None
        path = config.audit_path or audit_path
        return cls(config, embedder, audit=AuditLog(path) if path is not None else None, base_dir=base_dir)

    @cached_property
    def fingerprint(self) -> str:
        """Changes whenever the rules do (part of the answer cache key: new rules never meet stale answers)."""
        import hashlib

        return hashlib.sha256(self.config.model_dump_json().encode()).hexdigest()[:16]

    def _fit_classifier(self, base_dir: str | Path | None) -> TopicClassifier | None:
        cc = self.config.classifier
        examples = [(e, t.id) for t in self.config.topics for e in t.examples]
        examples += [(e, ORDINARY) for e in cc.ordinary]
        if cc.examples_file:
            path = Path(cc.examples_file)
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            examples += read_examples(path)
        known = {t.id for t in self.config.topics}
        for text, topic in examples:
            if topic != ORDINARY and topic not in known:
                raise InputError(f"example {text[:40]!r} names topic {topic!r}, which is not a policy topic "
                                 f"(known: {', '.join(sorted(known))})", field="policy.classifier.examples_file")
        if not cc.enabled or not any(t != ORDINARY for _, t in examples):
            return None
        if self.embedder is None:
            raise InputError("the policy classifier needs an embedder (set policy.classifier.enabled: false "
                             "to screen by rules only)", field="policy.classifier")
        vectors = np.asarray(self.embedder.encode([e for e, _ in examples]), dtype=np.float32)
        return TopicClassifier(sorted({t for _, t in examples if t != ORDINARY}), vectors,
                               [t for _, t in examples], c=cc.c, threshold=cc.threshold,
                               similarity_threshold=cc.similarity_threshold)

    # ---- screening -----------------------------------------------------------------------------
    def redact(self, text: str) -> tuple[str, list[Match]]:
        """`text` with every personal-data match replaced by its rule's placeholder, and the matches.

        Overlapping candidates: the longest wins (a card number is not also three phone numbers), then any
        rule before the phone detector, then the earlier rule in the config."""
        spans: list[tuple[int, int, int]] = []  # start, end, rule index
        for i, (_, pattern, check) in enumerate(self._pii):
            for m in pattern.finditer(text):
                if check is None or check(m.group()):
                    spans.append((m.start(), m.end(), i))
        # the phone detector (digit runs) goes last on a tie: an SSN or card number is also a digit run
        spans.sort(key=lambda s: (-(s[1] - s[0]), self._pii[s[2]][0].detector == "phone", s[2], s[0]))
        taken: list[tuple[int, int, int]] = []
        for s in spans:
            if all(s[1] <= t[0] or s[0] >= t[1] for t in taken):
                taken.append(s)
        taken.sort()
        out, last, counts = [], 0, {}
        for start, end, i in taken:
            out.append(text[last:start])
            out.append(self._pii[i][0].token)
            last = end
            counts[i] = counts.get(i, 0) + 1
        out.append(text[last:])
        matches = [Match(rule=r.id, kind="personal_data", action=r.action, reason=r.reason,
                         by="detector" if r.detector else "pattern", count=counts[i])
                   for i, (r, _, _) in enumerate(self._pii) if i in counts]
        return "".join(out), matches

    def screen_many(self, questions: Sequence[str]) -> list[Screening]:
        """Screen without auditing (evaluation); `screen` is the pipeline's entry point."""
        redacted = [self.redact(q) for q in questions]
        vectors = None
        flagged: list[dict[str, float]] = [{} for _ in questions]
        if self.classifier is not None and questions:
            vectors = np.asarray(self.embedder.encode([t for t, _ in redacted]), dtype=np.float32)
            flagged = self.classifier.flagged(vectors)
        out = []
        for n, (text, matches) in enumerate(redacted):
            for rule, phrases, patterns in self._topics:
                by = None
                if phrases is not None and phrases.search(text):
                    by = "phrase"
                elif any(p.search(text) for p in patterns):
                    by = "pattern"
                score = flagged[n].get(rule.id)
                if by is None and score is not None:
                    by = "classifier"
                if by is not None:
                    matches.append(Match(rule=rule.id, kind="topic", action=rule.action, reason=rule.reason,
                                         by=by, score=score))
            out.append(Screening(text=text, matches=matches, embedding=None if vectors is None else vectors[n]))
        return out

    def screen(self, question: str, *, user: str | None = None) -> Screening:
        """Screen one question; a flagged one gets an audit entry (redacted text and a keyed hash only)."""
        s = self.screen_many([question])[0]
        if s.flagged and self.audit is not None:
            s.query_hash = self.audit.query_hash(question)
            self.audit.append({"event": "screened", "query_hash": s.query_hash, "query_redacted": s.text,
                               "user": None if user is None else self.redact(user)[0], **s.to_dict(), "needs_review": True})
        return s


    def escalate(self, screening: Screening | None, text: str, experts: Sequence[str], *,
                 original: str | None = None, user: str | None = None) -> Screening:
        """The screening of a question routed to sensitive expert(s): one `sensitive-expert:NAME` match
        per such expert (the `sensitive_experts` action and reason) on top of what the rules found, and an
        audit entry. `text`: the question as the pipeline uses it (already redacted); `original`: as asked,
        for the keyed hash only."""
        rule = self.config.sensitive_experts
        base = screening or Screening(text=text)
        added = [Match(rule=f"sensitive-expert:{name}", kind="expert", action=rule.action, reason=rule.reason,
                       by="routing") for name in experts]
        out = Screening(text=base.text, matches=[*base.matches, *added], embedding=base.embedding,
                        query_hash=base.query_hash)
        if self.audit is not None:
            out.query_hash = out.query_hash or self.audit.query_hash(original if original is not None else text)
            self.audit.append({"event": "sensitive_expert", "experts": list(experts), "query_hash": out.query_hash,
                               "query_redacted": out.text, "user": None if user is None else self.redact(user)[0],
                               **out.to_dict(), "needs_review": True})
        return out


# ------------------------------------------------------------------------------------------ measuring


def screening_report(expert: PolicyExpert, questions: Sequence[Any], *, examples: int = 10) -> dict[str, Any]:
    """Catch and trigger rates of `expert` on question records (`data.types.Question`-like: .id,
    .question, .metadata). A record with `metadata.sensitive: true` counts towards the catch rate (and, with
    `expected_rule` / `expected_action`, whether the right rule and action came out); any other towards the
    false-trigger rate. No audit entries are written."""
    import time

    t = time.perf_counter()
    screenings = expert.screen_many([q.question for q in questions])
    ms = (time.perf_counter() - t) * 1000
    sens = [(q, s) for q, s in zip(questions, screenings, strict=True) if (q.metadata or {}).get("sensitive")]
    ordi = [(q, s) for q, s in zip(questions, screenings, strict=True) if not (q.metadata or {}).get("sensitive")]

    def rate(n: int, d: int) -> float | None:
        return None if d == 0 else round(n / d, 4)

    caught = [(q, s) for q, s in sens if s.flagged]
    with_rule = [(q, s) for q, s in sens if q.metadata.get("expected_rule")]
    with_action = [(q, s) for q, s in sens if q.metadata.get("expected_action")]
    right_rule = [(q, s) for q, s in with_rule if q.metadata["expected_rule"] in {m.rule for m in s.matches}]
    right_action = [(q, s) for q, s in with_action if q.metadata["expected_action"] == s.action]
    # how the expected topic rule was reached: rules alone, the classifier alone (score over its cut), or both
    by_classifier = [(q, s) for q, s in sens if any(m.rule == q.metadata.get("expected_rule") and m.kind == "topic"
                                                   and m.score is not None for m in s.matches)]
    topic_items = [(q, s) for q, s in sens if q.metadata.get("expected_rule") in {t.id for t in expert.config.topics}]
    triggered = [(q, s) for q, s in ordi if s.flagged]
    by_rule: dict[str, int] = {}
    for _, s in triggered:
        for m in s.matches:
            by_rule[f"{m.rule} ({m.by})"] = by_rule.get(f"{m.rule} ({m.by})", 0) + 1
    return {
        "questions": len(questions), "sensitive": len(sens), "ordinary": len(ordi),
        "catch_rate": rate(len(caught), len(sens)),
        "right_rule_rate": rate(len(right_rule), len(with_rule)),  # of those labelled with a rule / action
        "right_action_rate": rate(len(right_action), len(with_action)),
        "topic_classifier_catch_rate": rate(len(by_classifier), len(topic_items)),
        "false_trigger_rate": rate(len(triggered), len(ordi)),
        "false_triggers_by_rule": dict(sorted(by_rule.items(), key=lambda kv: -kv[1])),
        "missed": [{"id": q.id, "text": s.text, "expected_rule": q.metadata.get("expected_rule")}
                   for q, s in sens if not s.flagged][:examples],
        "false_trigger_examples": [{"id": q.id, "text": s.text, **s.to_dict()} for q, s in triggered][:examples],
        "ms_per_question": round(ms / max(len(questions), 1), 3),
    }
