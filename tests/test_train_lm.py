"""`expertrag train lm`: overfitting, balance, exact resume, data rendering, CLI, error messages."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from expertrag.errors import ExpertRAGError, InputError
from expertrag.model.checkpoint import read_checkpoint_config
from expertrag.model.train.batches import micro_batch
from expertrag.model.train.config import TrainConfig
from expertrag.model.train.data import TrainingData, data_file_kind, load_training_data
from expertrag.model.train.examples import Example
from expertrag.model.train.loop import train
from expertrag.model.upcycle import delta_parameters, upcycle
from expertrag.moe import MoEConfig

MOE = MoEConfig(num_experts=4, top_k=2, layers="all", expert_kind="lora", lora_rank=8, retrieval_expert=True,
                retrieval_rank=8, retrieval_heads=2)


def upcycled(tiny_llama, cfg: MoEConfig = MOE):
    torch.manual_seed(0)
    return upcycle(copy.deepcopy(tiny_llama), cfg)


def synthetic(n_corpus: int, n_qa: int, seed: int = 1, length: int = 16) -> TrainingData:
    g = torch.Generator().manual_seed(seed)
    corpus = []
    for _ in range(n_corpus):
        ids = torch.randint(3, 128, (length,), generator=g).tolist()
        corpus.append(Example(ids, list(ids), "corpus"))
    qa = []
    for i in range(n_qa):
        prompt = torch.randint(3, 128, (10,), generator=g).tolist()
        answer = torch.randint(3, 128, (3,), generator=g).tolist() + [1]
        passages = torch.randint(3, 128, (12,), generator=g).tolist() if i % 2 else []
        qa.append(Example(prompt + answer, [-100] * 10 + answer, "open" if passages else "closed", passages))
    return TrainingData(corpus=corpus, qa=qa, files={})


def cfg(**kw) -> TrainConfig:
    base = dict(batch_size=2, warmup_steps=0, lr_schedule="constant", log_every=5, checkpoint_every=0)
    return TrainConfig(**{**base, **kw})


def test_overfits_a_tiny_batch(tiny_llama):
    model = upcycled(tiny_llama)
    s = train(model, synthetic(2, 0), MOE, cfg(steps=50, lr=1e-2), base_model="tiny", progress=False)
    assert s["steps"] == 50
    assert s["loss_end"] < s["loss_start"] / 10, (s["loss_start"], s["loss_end"])
    assert s["tokens"] == 50 * 2 * 16


def test_base_stays_frozen_and_every_moe_parameter_trains(tiny_llama):
    model = upcycled(tiny_llama)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, synthetic(4, 4), MOE, cfg(steps=4, lr=1e-2), base_model="tiny", progress=False)
    deltas = set(delta_parameters(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == deltas
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == deltas  # every router, LoRA and retrieval-expert tensor moved; nothing else did
    assert {n.split(".mlp.")[1].split(".")[0] for n in deltas} == {"router", "experts", "retrieval"}


def test_aux_loss_keeps_experts_balanced(tiny_llama):
    model = upcycled(tiny_llama)
    s = train(model, synthetic(32, 16), MOE, cfg(steps=30, lr=3e-3, batch_size=4), base_model="tiny",
              progress=False)
    assert s["collapse_flags"] == []
    assert s["balance"]["min_share_x_E"] > 0.25
    for shares in s["token_share"].values():
        assert len(shares) == 4 and abs(sum(shares) - 1) < 1e-6
    r = s["retrieval"]
    assert r["closed"]["fire_rate"] == 0.0 and r["corpus"]["fire_rate"] == 0.0  # no passages: masked
    assert r["open"]["fire_rate"] == r["open"]["want_rate"] > 0.0
    assert 0 < r["closed"]["want_rate"] < 1
    assert s["aux_end"] > 0
    assert set(s["ce_by_kind"]) == {"corpus", "closed", "open"} and s["balance_end"]["min_share_x_E"] > 0


def test_only_chosen_groups_change(tiny_llama):
    model = upcycled(tiny_llama)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, synthetic(4, 4), MOE, cfg(steps=3, lr=1e-2, trainable="routers"), base_model="tiny",
          progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".router." in n for n in changed)


@pytest.mark.parametrize("save_dtype", ["float16", "float32"])
def test_resume_is_exact(tiny_llama, tmp_path, save_dtype):
    data = synthetic(8, 6)
    moe = MOE.model_copy(update={"router_jitter": 0.1})  # uses the RNG: resuming must restore it
    c = cfg(steps=6, lr=5e-3, grad_accum=2, warmup_steps=2, lr_schedule="cosine", save_dtype=save_dtype,
            checkpoint_every=2)
    whole = upcycled(tiny_llama, moe)
    s_whole = train(whole, data, moe, c, base_model="tiny", out_dir=tmp_path / "a", progress=False)

    first = upcycled(tiny_llama, moe)
    train(first, data, moe, c, base_model="tiny", out_dir=tmp_path / "b", progress=False, stop_at=3)
    assert read_checkpoint_config(tmp_path / "b")["step"] == 3
    torch.manual_seed(999)  # a fresh model with other expert init and RNG state
    second = upcycle(copy.deepcopy(tiny_llama), moe)
    s_resumed = train(second, data, moe, c, base_model="tiny", out_dir=tmp_path / "b", resume=True,
                      progress=False)
    for (n, a), b in zip(delta_parameters(whole).items(), delta_parameters(second).values(), strict=True):
        assert torch.equal(a, b), n
    assert s_resumed["steps"] == s_whole["steps"] == 6
    assert s_resumed["loss_start"] == s_whole["loss_start"] and s_resumed["loss_end"] == s_whole["loss_end"]
    for key in ("token_share", "token_share_end", "retrieval", "retrieval_end", "ce_by_kind"):
        assert s_resumed[key] == s_whole[key], key
    assert (tmp_path / "b" / "train_summary.json").is_file()


def test_resume_errors(tiny_llama, tmp_path):
    with pytest.raises(ExpertRAGError, match="nothing to resume"):
        train(upcycled(tiny_llama), synthetic(4, 0), MOE, cfg(steps=2), base_model="tiny", out_dir=tmp_path,
              resume=True, progress=False)
    train(upcycled(tiny_llama), synthetic(4, 0), MOE, cfg(steps=2), base_model="tiny", out_dir=tmp_path,
          progress=False)
    other = MOE.model_copy(update={"lora_rank": 4})
    with pytest.raises(ExpertRAGError, match="does not match the checkpoint"):
        train(upcycled(tiny_llama, other), synthetic(4, 0), other, cfg(steps=4), base_model="tiny",
              out_dir=tmp_path, resume=True, progress=False)


def test_micro_batches_are_deterministic_and_mixed():
    data = synthetic(10, 6)
    c = cfg(batch_size=4, qa_fraction=0.5)
    a = [id(e) for m in range(8) for e in micro_batch(data, c, m)]
    assert a == [id(e) for m in range(8) for e in micro_batch(data, c, m)]
    kinds = [e.kind for e in micro_batch(data, c, 0)]
    assert kinds.count("corpus") == 2
    # every corpus example once per epoch
    seen = [id(e) for m in range(5) for e in micro_batch(data, c, m) if e.kind == "corpus"]
    assert len(set(seen)) == 10
    assert TrainConfig(trainable="experts, routers").trainable == ["routers", "experts"]
    with pytest.raises(ValueError):
        TrainConfig(trainable="attention")
    with pytest.raises(ValueError):
        TrainConfig(bogus=1)


# --------------------------------------------------------------------------------------- real data

DOCS = [
    {"id": "p1", "title": "Aurora", "contents": "An aurora is a natural light display in polar skies. " * 6},
    {"id": "p2", "title": "Tide", "contents": "Tides are the rise and fall of sea levels caused by the Moon. " * 6},
    {"id": "p3", "title": "Everest", "contents": "Mount Everest is Earth's highest mountain above sea level. " * 6},
]
QUESTIONS = [
    {"id": "q1", "question": "What causes tides?", "golden_answers": ["the Moon"],
     "metadata": {"context_ids": ["p2", "p1"]}},
    {"id": "q2", "question": "What is the highest mountain?", "golden_answers": ["Mount Everest"],
     "metadata": {"context_ids": ["missing"]}},
    {"id": "q3", "question": "Unanswerable?", "golden_answers": []},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path):
    return write_jsonl(tmp_path / "corpus.jsonl", DOCS), write_jsonl(tmp_path / "questions.jsonl", QUESTIONS)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from expertrag.model.loading import load_tokenizer

    return load_tokenizer()


@pytest.mark.slow
def test_training_data_rendering(files, tokenizer):
    corpus, questions = files
    assert data_file_kind(corpus) == "corpus" and data_file_kind(questions) == "questions"
    data = load_training_data([corpus, questions], tokenizer, TrainConfig(seq_len=64, passages_k=2,
                                                                           passage_max_chars=80))
    counts = data.counts()
    assert counts["closed_book"] == 2 and counts["open_book"] == 1
    assert counts["questions_without_answer"] == 1 and counts["questions_without_passages"] == 1
    assert counts["corpus_blocks"] >= 3 and all(len(e.input_ids) <= 64 for e in data.corpus + data.qa)
    assert all(e.labels == e.input_ids for e in data.corpus)
    closed, open_ = data.qa[0], data.qa[1]
    assert (closed.kind, open_.kind) == ("closed", "open") and closed.passage_ids == []
    for ex, target in ((closed, "the Moon"), (open_, "the Moon [1]")):
        supervised = [t for t in ex.labels if t != -100]
        assert ex.input_ids[-len(supervised):] == supervised  # loss only on the answer at the end
        assert tokenizer.decode(supervised) == target + tokenizer.eos_token
    prompt = tokenizer.decode(open_.input_ids)
    assert "[1] Tide:" in prompt and "Question: What causes tides?" in prompt
    assert "<|im_start|>assistant\n" in prompt
    assert 0 < len(open_.passage_ids) <= 512
    assert tokenizer.decode(open_.passage_ids).startswith("Tide. Tides are")  # model.prompts.memory_text


@pytest.mark.slow
def test_expert_only_fusion_keeps_passages_out_of_the_prompt(tokenizer):
    """train.fusion: expert: the open-book example is the closed-book prompt with the passages in the
    retrieval expert's memory only, and that memory is token for token what `pipeline.fusion: expert` feeds
    the expert at answer time (the same memory_text, tokenised the same way)."""
    from expertrag.data.types import Question
    from expertrag.model.generation import encode_prompt
    from expertrag.model.prompts import closed_book_messages, memory_text
    from expertrag.model.train.examples import qa_examples
    from expertrag.retrieval.types import Hit

    q = Question(id="q", question="What causes tides?", golden_answers=["the Moon"])
    hits = [Hit("a", "Tide", "Tides are caused by the Moon's gravity.", 0.0),
            Hit("b", "Sea", "The sea is salty.", 0.0)]
    closed, open_ = qa_examples(q, hits, tokenizer, TrainConfig(seq_len=128, fusion="expert"))
    assert open_.kind == "open" and open_.input_ids == closed.input_ids and open_.labels == closed.labels
    prompt = tokenizer.decode(open_.input_ids)
    assert "Passages" not in prompt and "Tides are" not in prompt
    assert tokenizer.decode([t for t in open_.labels if t != -100]) == "the Moon" + tokenizer.eos_token
    answer_time = [i for t in [memory_text(hits)] for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
    assert open_.passage_ids == answer_time
    assert closed.input_ids[:len(encode_prompt(tokenizer, closed_book_messages(q.question)))] == \
        encode_prompt(tokenizer, closed_book_messages(q.question))


@pytest.mark.slow
def test_citation_needs_the_answer_as_words(tokenizer):
    """The open-book target cites the first passage holding the answer, judged as evaluation judges it
    (`answers.contains_answer`, word boundaries): "cat" is not in "cathedral"."""
    from expertrag.data.types import Question
    from expertrag.model.train.examples import qa_examples
    from expertrag.retrieval.types import Hit

    q = Question(id="q", question="Which animal?", golden_answers=["cat"])
    hits = [Hit("a", "Church", "A cathedral is a large church.", 0.0),
            Hit("b", "Pets", "The cat sat on the mat.", 0.0)]
    _, open_ = qa_examples(q, hits, tokenizer, TrainConfig(seq_len=128))
    assert tokenizer.decode([t for t in open_.labels if t != -100]) == "cat [2]" + tokenizer.eos_token


def test_data_errors(tmp_path):
    with pytest.raises(InputError, match=f"{tmp_path / 'missing.jsonl'}: no such file"):
        data_file_kind(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(InputError, match=f"{bad}:1: not a JSONL data file"):
        data_file_kind(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match="empty file"):
        data_file_kind(empty)


@pytest.mark.slow
def test_data_errors_with_tokenizer(tmp_path, tokenizer):
    q = write_jsonl(tmp_path / "q.jsonl", [{"question": "Why?", "golden_answers": []}])
    with pytest.raises(InputError, match="no training examples"):
        load_training_data([q], tokenizer, TrainConfig())
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"question": "ok?", "golden_answers": ["a"]}) + "\n" + "{oops\n")
    with pytest.raises(InputError, match=f"{broken}:2: malformed JSON"):
        load_training_data([broken], tokenizer, TrainConfig())


def _invoke(*args: str):
    from typer.testing import CliRunner

    import expertrag.cli.train_lm  # noqa: F401  (registers `train lm`)
    from expertrag.cli.app import app

    return CliRunner().invoke(app, ["train", "lm", *args])


def test_cli_config_errors(tmp_path):
    from expertrag.cli.train_lm import load_config
    from expertrag.errors import ConfigError

    conf = tmp_path / "c.yaml"
    conf.write_text("train:\n  seq_len: 64\n  trainable: routers\nmoe:\n  num_experts: 2\n  top_k: 1\n")
    config, train_cfg = load_config(conf)
    assert train_cfg.seq_len == 64 and train_cfg.trainable == ["routers"]
    assert "moe" in config.model_fields_set and config.moe.num_experts == 2
    conf.write_text("train:\n  seq_len: 64\n  nope: 1\n")
    with pytest.raises(ConfigError, match=f"{conf}: train.nope"):
        load_config(conf)
    conf.write_text("model:\n  nope: 1\n")
    with pytest.raises(ConfigError, match="model.nope"):
        load_config(conf)
    config, train_cfg = load_config(None)
    assert "moe" not in config.model_fields_set and train_cfg == TrainConfig()


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run the console entry point (`expertrag train lm ...`): (exit code, stderr)."""
    from expertrag.cli import main

    monkeypatch.setattr("sys.argv", ["expertrag", "train", "lm", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


def test_cli_user_errors_exit_2(tmp_path, monkeypatch, capsys, files):
    missing = tmp_path / "nope.jsonl"
    code, err = _main(monkeypatch, capsys, "--data", str(missing), "--out", str(tmp_path / "out"))
    assert code == 2 and err == f"error: {missing}: no such file or directory\n"
    corpus, _ = files  # a real data file, but nothing in --out to resume from (fails before loading a model)
    code, err = _main(monkeypatch, capsys, "--data", str(corpus), "--out", str(tmp_path / "out"), "--resume")
    assert code == 2 and err == f"error: {tmp_path / 'out'}: nothing to resume (no checkpoint there)\n"


@pytest.mark.slow
def test_cli_smoke_real_model(files, tmp_path, smollm2_dir):
    from expertrag.model.checkpoint import checkpoint_size
    from expertrag.model.moe_model import load_moe_model

    corpus, questions = files
    out = tmp_path / "run"
    conf = tmp_path / "c.yaml"
    conf.write_text("train:\n  seq_len: 96\n  batch_size: 2\n  passages_k: 1\n")
    res = _invoke("--data", str(corpus), "--data", str(questions), "--steps", "2", "--out", str(out), "--json",
                  "--config", str(conf))
    assert res.exit_code == 0, (res.output, res.exception)
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["examples"]["open_book"] == 1
    assert summary["train"]["seq_len"] == 96 and summary["moe"]["expert_kind"] == "lora"
    assert summary["checkpoint_bytes"] == checkpoint_size(out) <= 20e6
    meta = read_checkpoint_config(out)
    assert meta["step"] == 2 and meta["dtype"] == "float16" and meta["layers"] == list(range(1, 30, 2))
    model, _ = load_moe_model(None, None, out)
    assert model.moe_layers == meta["layers"]
    assert not any(p.requires_grad for p in model.parameters())
    res = _invoke("--data", str(corpus), "--data", str(questions), "--steps", "2", "--out", str(out), "--resume",
                  "--config", str(conf))
    assert res.exit_code == 0 and "trained 2 steps" in res.output  # already done: nothing more to train


def test_open_book_passages_come_from_an_int8_index_with_the_config_retrieval_section(tmp_path):
    """`train lm --index` searches with the config's retrieval settings: an onnx-int8 index (as
    indexes/shared is) is searched with int8 queries, and without the setting the mismatch is named."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from expertrag.data.types import Document, Question
    from expertrag.model.train.data import find_passages
    from expertrag.retrieval import build_index
    from expertrag.retrieval.config import RetrievalConfig

    cfg = RetrievalConfig(embed_backend="onnx-int8")
    docs = [Document("t", "Tide", "Tides are caused by the Moon's gravity."),
            Document("s", "Sea", "The sea is salty because rivers carry minerals into it.")]
    build_index(tmp_path / "int8", docs, retrieval=cfg, progress=False)
    q = Question(id="q", question="What causes tides?", golden_answers=["the Moon"])
    hits = find_passages([q], [], TrainConfig(passages_k=1), tmp_path / "int8", cfg)
    assert [h.id for h in hits[0]] == ["t"]
    from expertrag.errors import IndexFormatError

    with pytest.raises(IndexFormatError, match="built with embed backend 'onnx-int8'"):
        find_passages([q], [], TrainConfig(passages_k=1), tmp_path / "int8")
