"""`expertrag expert train` and `expertrag eval-policy` end to end (subprocesses, real models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving import build_index
from test_index_cli import run_cli, write_jsonl

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
POLICY_YAML = str(ROOT / "configs" / "policy.yaml")
SENSITIVE = str(ROOT / "src" / "expertrag" / "assets" / "policy_sensitive.jsonl")

MED = [
    ("Aspirin", "Aspirin is a salicylate used to reduce pain, fever and inflammation, and to prevent clots."),
    ("Insulin", "Insulin is a peptide hormone produced by beta cells of the pancreatic islets."),
    ("Asthma", "Asthma is a long-term inflammatory disease of the airways of the lungs."),
    ("Measles", "Measles is a highly contagious disease caused by the measles virus, prevented by vaccination."),
    ("Anemia", "Anemia is a decrease in the total amount of red blood cells or hemoglobin in the blood."),
    ("Sepsis", "Sepsis is a life-threatening condition when the body's response to infection injures its tissues."),
]


@pytest.fixture(scope="module")
def domain_index(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("experts")
    rows = [{"id": f"m{i}", "title": t, "contents": c, "metadata": {"domain": "medicine"}}
            for i, (t, c) in enumerate(MED)]
    rows.append({"id": "secret", "title": "Trial X", "contents": "Unpublished trial X results for internal staff.",
                 "metadata": {"domain": "medicine", "groups": ["staff"]}})
    rows.append({"id": "f1", "title": "Bond", "contents": "A bond is a fixed-income instrument representing a loan.",
                 "metadata": {"domain": "finance"}})
    # built in this process: the commands under test here are `expert train` and `eval-policy` (their own
    # processes below); `expertrag index` end to end is test_index_cli's
    build_index(tmp, rows)
    return tmp


def test_expert_train_fits_and_saves_an_adapter(domain_index, smollm2):
    import copy

    from expertrag.experts.adapter import detach, load_adapter

    index = domain_index / "index"
    qa = write_jsonl(domain_index / "qa.jsonl", [{"id": "q1", "question": "What produces insulin?",
                                                  "golden_answers": ["beta cells of the pancreas"]}])
    proc = run_cli("expert", "train", "--index", str(index), "--name", "med", "--domain", "medicine", "--steps", "2",
                   "--seq-len", "32", "--batch-size", "2", "--rank", "2", "--heldout", "0.34", "--qa", str(qa),
                   "--threads", "1", "--json")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["steps"] == 2 and r["trainable_parameters"] > 0 and r["domain"] == "medicine"
    assert r["passages"] == {"train": 4, "heldout": 2}  # public medicine passages only (not Trial X, not finance)
    assert r["qa_examples"] == 1 and r["perplexity_before"] > 1 and r["perplexity_after"] > 1
    folder = index / "experts" / "med" / "adapter"
    assert json.loads((folder / "expertrag_adapter.json").read_text())["steps"] == 2
    model = copy.deepcopy(smollm2[0])
    load_adapter(model, folder)  # it fits the real base model
    detach(model)
    bench = run_cli("bench", "adapter", "--adapter", str(folder), "--corpus", str(domain_index / "corpus.jsonl"),
                    "--json")
    b = json.loads(bench.stdout.strip().splitlines()[-1])
    assert b["attach_ms_median"] > 0 and b["tokens_per_s_base"] > 0 and b["tokens_per_s_adapter"] > 0
    assert b["corpus_perplexity_base"] > 1 and b["corpus_perplexity_adapter"] > 1


def test_expert_train_bad_domain_is_one_line(domain_index):
    proc = run_cli("expert", "train", "--index", str(domain_index / "index"), "--name", "x", "--domain", "law",
                   "--steps", "1", check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "\n" not in err and "no public passages of domain 'law'" in err and "finance, medicine" in err


def test_expert_train_reads_the_registry_and_records_the_adapter(domain_index):
    """A registered expert: the domain comes from its record, and the record then names its adapter (a new
    version); an unregistered name without --domain, or a --domain that contradicts the record, is refused."""
    from expertrag.experts.registry import ExpertRegistry

    index = domain_index / "index"
    run_cli("expert", "add", "--index", str(index), "--name", "fin", "--domain", "finance")
    no = run_cli("expert", "train", "--index", str(index), "--name", "nobody", "--steps", "1", check=False)
    assert no.returncode == 2 and "not a registered domain expert" in no.stderr
    clash = run_cli("expert", "train", "--index", str(index), "--name", "fin", "--domain", "medicine", "--steps", "1",
                    check=False)
    assert clash.returncode == 2 and "registered for domain 'finance'" in clash.stderr
    before = ExpertRegistry(index).snapshot().get("fin")
    proc = run_cli("expert", "train", "--index", str(index), "--name", "fin", "--steps", "1", "--seq-len", "16",
                   "--batch-size", "1", "--rank", "2", "--heldout", "0", "--threads", "1", "--json")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    after = ExpertRegistry(index).snapshot().get("fin")
    assert r["domain"] == "finance" and r["registry_adapter"] == "experts/fin/adapter"
    assert after.adapter == "experts/fin/adapter" and after.version == before.version + 1
    assert (index / after.adapter / "adapter_config.json").is_file()


def test_eval_policy_reports_both_rates(tmp_path):
    ordinary = write_jsonl(tmp_path / "ordinary.jsonl", [
        {"id": "o1", "question": "who wrote the novel moby dick"},
        {"id": "o2", "question": "what is the boiling point of water at sea level"},
        {"id": "o3", "question": "email me at bob@example.com the train times"}])  # an ordinary file can trigger
    proc = run_cli("eval-policy", "--config", POLICY_YAML, "-d", SENSITIVE, "-d", str(ordinary), "--json")
    r = json.loads(proc.stdout.strip().splitlines()[-1])["datasets"]
    sens = r[SENSITIVE]
    assert sens["sensitive"] == 54 and sens["ordinary"] == 0 and sens["catch_rate"] >= 0.9
    o = r[str(ordinary)]
    assert o["ordinary"] == 3 and o["false_trigger_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert o["false_trigger_examples"][0]["text"] == "email me at [EMAIL] the train times"
