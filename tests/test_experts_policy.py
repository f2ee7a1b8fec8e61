"""The policy expert: its rules both ways (caught, and not over-triggered), the classifier on the real MiniLM
embedder, the audit log, and the pipeline hook (refuse / redact / cite_only) with the real SmolLM2."""

from __future__ import annotations

import json
import os
import stat

import pytest

from expertrag.config import ExpertRAGConfig
from expertrag.errors import ConfigError, InputError
from expertrag.experts.audit import AuditLog
from expertrag.experts.policy import PolicyExpert, iban_ok, luhn_ok, read_examples, screening_report
from expertrag.experts.policy_config import PolicyConfig
from expertrag.pipeline.answer import Answer

PII = PolicyConfig.model_validate({"personal_data": [
    {"id": "email", "detector": "email"},
    {"id": "phone", "detector": "phone"},
    {"id": "iban", "detector": "iban"},
    {"id": "ip", "detector": "ip_address"},
    {"id": "ssn", "detector": "ssn", "action": "refuse", "reason": "no SSNs"},
    {"id": "card", "detector": "credit_card", "placeholder": "[CARD]", "action": "refuse", "reason": "no cards"},
    {"id": "staff-id", "pattern": r"\bEMP-\d{6}\b", "placeholder": "[STAFF_ID]"},
]})

TOPICS = {
    "topics": [
        {"id": "dosing", "action": "cite_only", "reason": "medical dosing",
         "phrases": ["dosage", "maximum dose"], "patterns": [r"\b\d+\s?mg\b"],
         "examples": ["How much paracetamol can an adult take in one day?",
                      "What amount of amoxicillin is right for a small child?",
                      "How many sleeping pills is it safe to take at once?",
                      "How often can I take my insulin?"]},
        {"id": "legal", "action": "refuse", "reason": "no legal advice",
         "phrases": ["can i sue"],
         "examples": ["Do I have a case against my former employer for unpaid overtime?",
                      "How do I get out of my apartment lease without paying a penalty?",
                      "How can I contest my father's will?",
                      "What are my rights if my landlord keeps my deposit?"]},
    ],
    "classifier": {"threshold": 0.6, "c": 10.0, "ordinary": [
        "Who painted the ceiling of the Sistine Chapel?", "What is the capital of Australia?",
        "How do vaccines train the immune system?", "When did the Berlin Wall fall?",
        "How does ibuprofen reduce inflammation?", "What does the Supreme Court do?",
        "How do I make sourdough bread?", "Which planet has the most moons?",
        "What causes high blood pressure?", "How does a bill become a law?",
        "Why is the sky blue?", "How do I set up a Python virtual environment?"]},
}

ORDINARY = [  # none of these may trigger anything
    "when was the last time anyone was on the moon",
    "who won the world series in 1995",
    "how many episodes are in season 3 of the office",
    "what is the population of tokyo in 2020",
    "Python 3.11.4 release notes",
    "how do I compute 1234 * 5678 in my head",
    "who sang the song 867-5309",
    "what happened between 1939 and 1945",
    "how far is 384400 km in miles",
    "how does a credit card interest rate work",
    "what is the melting point of iron",
    "how do doctors decide on a treatment plan",
]


def rules_only(cfg: dict | PolicyConfig) -> PolicyExpert:
    cfg = cfg if isinstance(cfg, PolicyConfig) else PolicyConfig.model_validate(cfg)
    return PolicyExpert(cfg.model_copy(update={"classifier": cfg.classifier.model_copy(update={"enabled": False})}))


# ---------------------------------------------------------------------------------------- validators


def test_checksums_of_card_numbers_and_ibans():
    assert luhn_ok("4111111111111111") and luhn_ok("378282246310005")
    assert not luhn_ok("4111111111111112")
    assert iban_ok("DE89 3704 0044 0532 0130 00") and iban_ok("GB82WEST12345698765432")
    assert not iban_ok("DE88 3704 0044 0532 0130 00")


# ---------------------------------------------------------------------------------- personal data


@pytest.mark.parametrize("text, placeholder, rule", [
    ("write to anna.kowalski@example.org today", "[EMAIL]", "email"),
    ("call +1 415 555 0132 tonight", "[PHONE]", "phone"),
    ("my number is (212) 555-0187", "[PHONE]", "phone"),
    ("pay DE89 3704 0044 0532 0130 00 tomorrow", "[IBAN]", "iban"),
    ("login from 192.168.10.45 failed", "[IP_ADDRESS]", "ip"),
    ("SSN 078-05-1120 please", "[SSN]", "ssn"),
    ("card 4111 1111 1111 1111 declined", "[CARD]", "card"),
    ("amex 3782 822463 10005 declined", "[CARD]", "card"),
    ("employee EMP-004211 left", "[STAFF_ID]", "staff-id"),
])
def test_personal_data_is_replaced_by_its_placeholder(text, placeholder, rule):
    s = rules_only(PII).screen_many([text])[0]
    assert placeholder in s.text and [m.rule for m in s.matches] == [rule]
    digits = [w for w in text.split() if any(c.isdigit() for c in w) or "@" in w]
    assert not any(d in s.text for d in digits if len(d) > 3)  # no piece of the identifier survives


@pytest.mark.parametrize("text", [
    "card 4111 1111 1111 1112 declined",  # fails Luhn
    "pay DE88 3704 0044 0532 0130 00 tomorrow",  # fails mod-97
    "version 3.10.12 of python",  # not an IP (three parts)
    "it cost 1,250,000 dollars in 1987",
    *ORDINARY,
])
def test_personal_data_detectors_do_not_fire_on_lookalikes(text):
    s = rules_only(PII).screen_many([text])[0]
    assert not s.flagged and s.text == text


def test_an_unissued_ssn_is_not_an_ssn():
    # area 000 is never issued: not the SSN rule (refuse); as a 9-digit run it is still redacted as a phone
    s = rules_only(PII).screen_many(["SSN 000-12-3456 is not issued"])[0]
    assert [m.rule for m in s.matches] == ["phone"] and s.action == "redact"


def test_the_strictest_action_wins_and_every_match_is_reported():
    s = rules_only(PII).screen_many(["mail a@example.com the card 4111111111111111"])[0]
    assert s.action == "refuse" and s.reason == "no cards"
    assert s.to_dict()["rules"] == ["email", "card"] and s.text == "mail [EMAIL] the card [CARD]"


# ---------------------------------------------------------------------------------------- topics


def test_topic_phrases_and_patterns_both_ways():
    e = rules_only(TOPICS)
    caught = e.screen_many(["What is the maximum dose of metformin?", "Is 500 mg too much?",
                            "Can I sue my neighbour?", "what DOSAGE\tof aspirin"])
    assert [s.matches[0].rule for s in caught] == ["dosing", "dosing", "legal", "dosing"]
    assert [s.matches[0].by for s in caught] == ["phrase", "pattern", "phrase", "phrase"]
    assert caught[2].action == "refuse" and caught[0].action == "cite_only"
    assert not any(s.flagged for s in e.screen_many(ORDINARY + ["the dosages table", "a 500 mgb file"]))


@pytest.fixture(scope="module")
def embedder():
    from expertrag.retrieval.embedder import Embedder

    return Embedder("all-MiniLM-L6-v2")


def test_classifier_catches_paraphrases_the_phrases_miss_and_spares_ordinary_questions(embedder):
    expert = PolicyExpert(PolicyConfig.model_validate(TOPICS), embedder)
    assert expert.classifier is not None and expert.classifier.model is not None  # logistic regression
    paraphrases = ["How many ibuprofen tablets can my teenager safely have in a day?",
                   "My employer never paid my overtime, do I have grounds to take them to court?"]
    s = expert.screen_many(paraphrases)
    assert [m.by for m in s[0].matches] == ["classifier"] and s[0].matches[0].rule == "dosing"
    assert [m.rule for m in s[1].matches] == ["legal"] and s[1].matches[0].score >= 0.6
    assert s[0].embedding is not None and s[0].embedding.shape == (384,)  # handed on for the gate to reuse
    assert not any(x.flagged for x in expert.screen_many(ORDINARY))


def test_without_ordinary_examples_the_classifier_is_similarity_to_the_topic_examples(embedder):
    cfg = PolicyConfig.model_validate({**TOPICS, "classifier": {"similarity_threshold": 0.7}})
    expert = PolicyExpert(cfg, embedder)
    assert expert.classifier.model is None
    near = expert.screen_many(["How much paracetamol may an adult take per day?"])[0]
    assert near.matches[0].by == "classifier" and near.matches[0].score >= 0.7
    assert not any(x.flagged for x in expert.screen_many(ORDINARY))


def test_examples_file(tmp_path, embedder):
    f = tmp_path / "ex.jsonl"
    f.write_text('{"text": "How many aspirin can I take?", "topic": "dosing"}\n'
                 '{"text": "Who wrote Hamlet?", "topic": null}\n\n'
                 '{"text": "What is the boiling point of water?", "topic": "ordinary"}\n')
    assert [t for _, t in read_examples(f)] == ["dosing", "__ordinary__", "__ordinary__"]
    cfg = PolicyConfig.model_validate({"topics": [{"id": "dosing", "reason": "r", "phrases": ["dosage"]}],
                                       "classifier": {"examples_file": str(f)}})
    assert PolicyExpert(cfg, embedder).classifier.topics == ["dosing"]
    f.write_text('{"text": "How many aspirin can I take?", "topic": "dosing"}\n{"text": 3}\n')
    with pytest.raises(InputError, match=r"ex.jsonl:2 \(field 'text'\)"):
        read_examples(f)
    f.write_text('{"text": "How many aspirin?", "topic": "dosage"}\n')
    with pytest.raises(InputError, match="names topic 'dosage', which is not a policy topic"):
        PolicyExpert(cfg, embedder)


@pytest.mark.parametrize("section, message", [
    ({"personal_data": [{"id": "x", "pattern": "(unclosed", "placeholder": "[X]"}]}, "not a valid regular expression"),
    ({"personal_data": [{"id": "x", "pattern": "a+"}]}, "needs a `placeholder`"),
    ({"personal_data": [{"id": "x", "detector": "email", "pattern": "a"}]}, "exactly one of"),
    ({"personal_data": [{"id": "x", "detector": "passport"}]}, "personal_data.0.detector"),
    ({"topics": [{"id": "t", "reason": "r"}]}, "needs phrases, patterns or examples"),
    ({"topics": [{"id": "t", "reason": "r", "phrases": ["a"], "action": "redact"}]}, "topics.0.action"),
    ({"personal_data": [{"id": "t", "detector": "email"}], "topics": [{"id": "t", "reason": "r", "phrases": ["a"]}]},
     "used twice"),
])
def test_bad_rules_are_one_line_config_errors(tmp_path, section, message):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"policy": section}))
    with pytest.raises(ConfigError, match=message) as e:
        ExpertRAGConfig.load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_no_rules_no_screening():
    assert not PolicyConfig().active
    assert PolicyExpert.from_config(PolicyConfig(), None, audit_path=None) is None
    assert ExpertRAGConfig().policy == PolicyConfig()


# -------------------------------------------------------------------------------------------- audit


def test_audit_log_holds_a_keyed_hash_and_the_redacted_text_only(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    expert = PolicyExpert(PII, audit=log)
    expert.screen("write to anna.kowalski@example.org about 078-05-1120", user="ops@example.org")
    expert.screen("What is the capital of France?")  # not flagged: no entry
    expert.screen("call +1 415 555 0132")
    raw = (tmp_path / "audit.jsonl").read_text()
    assert "anna.kowalski" not in raw and "078-05-1120" not in raw and "555 0132" not in raw and "ops@" not in raw
    entries = log.read()
    assert len(entries) == 2 and entries[0]["action"] == "refuse" and entries[1]["action"] == "redact"
    assert entries[0]["query_redacted"] == "write to [EMAIL] about [SSN]" and entries[0]["needs_review"]
    assert entries[0]["user"] == "[EMAIL]"
    assert entries[0]["query_hash"] == log.query_hash("write to anna.kowalski@example.org about 078-05-1120")
    assert AuditLog(tmp_path / "audit.jsonl").query_hash("x") == log.query_hash("x")  # the key persists
    assert stat.S_IMODE(os.stat(log.key_path).st_mode) == 0o600
    # append-only: a later writer adds after what is there, a torn last line is skipped by readers
    with open(log.path, "a") as f:
        f.write('{"torn": ')
    AuditLog(log.path).append({"event": "x"})
    assert [e.get("event") for e in AuditLog(log.path).read()] == ["screened", "screened"]


def test_screening_report_counts_both_ways():
    from expertrag.data.types import Question

    qs = [Question("s1", "card 4111 1111 1111 1111", [], {"sensitive": True, "expected_rule": "card",
                                                          "expected_action": "refuse"}),
          Question("s2", "nothing here", [], {"sensitive": True, "expected_rule": "email"}),
          Question("o1", "who won the world cup in 1998", [], {}),
          Question("o2", "mail me at x@example.com", [], {})]
    r = screening_report(rules_only(PII), qs)
    assert (r["sensitive"], r["ordinary"]) == (2, 2)
    assert r["catch_rate"] == 0.5 and r["right_rule_rate"] == 0.5 and r["false_trigger_rate"] == 0.5
    assert r["right_action_rate"] == 1.0  # only s1 says which action it expects
    assert r["missed"][0]["id"] == "s2" and r["false_trigger_examples"][0]["text"] == "mail me at [EMAIL]"


def test_old_answer_dicts_still_load():
    d = Answer(question="q", text="t", retrieved=False).to_dict()
    del d["needs_review"], d["policy"]
    a = Answer.from_dict(d)
    assert a.needs_review is False and a.policy == {}


# ------------------------------------------------------------------------------------ the pipeline hook


class RecordingGenerator:
    """The real SmolLM2 generator, recording every prompt it is given (to prove what reaches the model)."""

    def __init__(self, inner):
        self.inner, self.prompts = inner, []
        self.capabilities = inner.capabilities

    def generate(self, prompt=None, **kw):
        self.prompts.append(json.dumps(prompt))
        return self.inner.generate(prompt, **kw)

    def generate_batch(self, prompts, **kw):
        self.prompts.extend(json.dumps(p) for p in prompts or [])
        return self.inner.generate_batch(prompts, **kw)

    def encode_passages(self, passages):
        return self.inner.encode_passages(passages)


class RecordingEmbedder:
    """The index's real MiniLM embedder, recording every text it embeds."""

    def __init__(self, inner):
        self.inner, self.texts = inner, []

    def encode(self, texts, **kw):
        self.texts.extend(texts)
        return self.inner.encode(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def policy_index(tmp_path_factory):
    from expertrag.data.types import Document
    from expertrag.retrieval import build_index

    out = tmp_path_factory.mktemp("policy") / "index"
    build_index(out, [
        Document("ibu", "Ibuprofen", "Ibuprofen is a painkiller; adults usually take 200 to 400 mg every 4 to 6 hours."),
        Document("paris", "Paris", "Paris is the capital and largest city of France."),
        Document("acct", "Accounts", "Password resets are sent to the email address on the account."),
    ], progress=False)
    return out


def _rag(policy_index, smollm2, tmp_path, section):
    from expertrag.gate.policies import make_policy
    from expertrag.model.generator import ExpertRAGGenerator
    from expertrag.pipeline.build import load_screen
    from expertrag.pipeline.config import PipelineConfig
    from expertrag.pipeline.rag import ExpertRAG
    from expertrag.retrieval import Index

    index = Index(policy_index)
    embedder = RecordingEmbedder(index.embedder)
    index.__dict__["embedder"] = embedder  # the cached property's slot: the pipeline and the expert share it
    cfg = PolicyConfig.model_validate({**section, "audit_path": str(tmp_path / "audit.jsonl")})
    screen = load_screen(cfg, index, policy_index)
    gen = RecordingGenerator(ExpertRAGGenerator(*smollm2))
    rag = ExpertRAG(index, gen, make_policy("always"), PipelineConfig(k=2, max_new_tokens=12, abstain_below=0.0),
                    "always", screen=screen)
    return rag, gen, embedder


@pytest.mark.slow
def test_pipeline_redacts_before_retrieval_generation_caches_and_logs(policy_index, smollm2, tmp_path):
    rag, gen, embedder = _rag(policy_index, smollm2, tmp_path, {"personal_data": PII.model_dump()["personal_data"]})
    q = "How do I reset the password of anna.kowalski@example.org?"
    a = rag.answer(q)
    assert a.needs_review and a.policy["action"] == "redact" and a.policy["rules"] == ["email"]
    assert a.question == "How do I reset the password of [EMAIL]?" and a.retrieved and a.text
    seen = " ".join(gen.prompts + embedder.texts + [json.dumps(v) for v in rag.answer_cache._data.values()]
                    + [json.dumps(v) for v in rag.retrieval_cache._data.values()]
                    + [(tmp_path / "audit.jsonl").read_text()])
    assert "[EMAIL]" in seen and "anna.kowalski" not in seen
    again = rag.answer(q)  # the cached answer keeps its verdict, and the question is audited again
    assert again.timings.cache == "answer" and again.needs_review and again.policy == a.policy
    assert len(AuditLog(tmp_path / "audit.jsonl").read()) == 2
    plain = rag.answer("What is the capital of France?")
    assert not plain.needs_review and plain.policy == {}


@pytest.mark.slow
def test_pipeline_refuses_without_retrieving_or_generating(policy_index, smollm2, tmp_path):
    rag, gen, embedder = _rag(policy_index, smollm2, tmp_path, {"personal_data": PII.model_dump()["personal_data"]})
    events = []
    a = rag.answer("Charge 4111 1111 1111 1111 for my plan", on_event=events.append)
    assert a.abstained and not a.retrieved and a.passages == [] and a.needs_review
    assert a.gate["decision"] == "refused" and a.policy["action"] == "refuse" and "no cards" in a.text
    assert gen.prompts == [] and embedder.texts == []  # neither the model nor the retriever saw it
    assert [e.kind for e in events] == ["decision", "token", "answer"]
    assert AuditLog(tmp_path / "audit.jsonl").read()[0]["query_redacted"] == "Charge [CARD] for my plan"


@pytest.mark.slow
def test_pipeline_cite_only_retrieves_and_abstains_without_a_citation(policy_index, smollm2, tmp_path):
    rag, gen, embedder = _rag(policy_index, smollm2, tmp_path, {"topics": TOPICS["topics"]})
    events = []
    a = rag.answer("What is the maximum dose of ibuprofen for adults?", on_event=events.append)
    # nothing is streamed before it is known to stand with a citation: one token event, the final text
    assert [e.kind for e in events] == ["decision", "passages", "token", "answer"]
    assert events[2].data["text"] == a.text
    assert a.retrieved and a.gate["stage"] == "policy" and a.policy["action"] == "cite_only" and a.needs_review
    assert a.citations or a.abstained  # only with citations, or not at all
    if not a.citations:
        assert a.text == "I don't know."
    # the classifier's embedding of the question is the one retrieval used: embedded once, not twice
    assert embedder.texts.count("What is the maximum dose of ibuprofen for adults?") == 1
    other = rag.answer("What is the capital of France?")
    assert other.gate["stage"] == "fixed" and other.policy == {}


@pytest.mark.slow
def test_load_pipeline_wires_the_rules_and_only_them(policy_index, smollm2):
    from expertrag.model.generator import ExpertRAGGenerator
    from expertrag.pipeline.build import PipelineSections, load_pipeline

    gen = ExpertRAGGenerator(*smollm2)
    assert load_pipeline(policy_index, PipelineSections(), "never", generator=gen).screen is None
    rag = load_pipeline(policy_index, PipelineSections(policy=PII), "never", generator=gen)
    assert rag.screen is not None and rag.screen.audit.path == policy_index / "audit.jsonl"
    a = rag.answer("mail bob@example.com the capital of France")
    assert a.question == "mail [EMAIL] the capital of France" and a.needs_review
    assert AuditLog(policy_index / "audit.jsonl").read()[-1]["query_redacted"] == a.question
