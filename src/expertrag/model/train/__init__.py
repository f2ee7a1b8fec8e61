"""Continued training of the upcycled MoE model (`expertrag train lm`), one concern a module.

    config.py    TrainConfig, the `train` section of the root config (no torch import)
    examples.py  Example; corpus blocks and closed-/open-book QA examples, rendered as the pipeline prompts
    data.py      which files are corpora and which questions, passages for the questions, TrainingData
    batches.py   which examples form micro-batch m (a pure function of seed and m) and their collation
    schedule.py  the learning rate at a step (warm-up, then constant or cosine)
    tally.py     routing and retrieval-expert counts accumulated over steps
    loop.py      one micro-step (loss = CE + the MoE layers' own router losses) and the training loop
    summary.py   the run's summary (loss start/end, speed, balance, retrieval)
    run.py       run_train_lm: base model -> upcycle -> data -> train -> checkpoint

Data
- Corpus files (JSONL `{id, title, contents}`, or anything `iter_documents` reads): each document as
  "title\\ncontents" + EOS, concatenated in file order and cut into fixed `seq_len`-token blocks; the loss
  is on every token.
- Question files (`{id, question, golden_answers, metadata}`): each question with an answer becomes a
  closed-book example (question only) and, when passages can be found, an open-book one (numbered
  passages + question), both rendered with the chat template exactly as the pipeline prompts them
  (`model.prompts`). The target is the first golden answer (+ " [n]" citing the first passage that
  contains an answer, as the open-book system prompt asks) + EOS; the loss is on those tokens only.
  Passages come from `Index(dir).search` when an index is given, else from `metadata.context_ids` looked
  up in the corpus files given. Open-book examples also hand the passages to the retrieval expert
  (`model.encode_passages`), so the routers and the retrieval expert learn when passages help.
A data file is a question file when its first record has a `question` field, else a corpus.

Loop: AdamW over the chosen MoE parameter groups (the base stays frozen), gradient accumulation,
clipping, warm-up + constant/cosine learning rate. Loss = cross-entropy + mean over MoE layers of
(aux_loss_coef * load balancing + z_loss_coef * z-loss) as each MoE layer computes them, padding excluded
(the decoder hands the layers the attention mask). The order of examples is a pure function of
(seed, step), so a run resumed from a checkpoint computes exactly what an uninterrupted run does
(optimizer state, RNG state and fp32 master weights are saved with every checkpoint).

Nothing here imports the root `expertrag.config`: the caller (the cli) passes the sections it needs.
"""
