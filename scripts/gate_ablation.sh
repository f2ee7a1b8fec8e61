#!/usr/bin/env bash
# One gate-ablation row: train the gate of configs/gate_ablation/ROW.yaml on the train split (once; delete
# OUT/ROW/gate to retrain) and evaluate it on SPLIT from the labels alone (no answers generated), with
# bootstrap intervals and the gate's cost as a share of measured answer time.
#   scripts/gate_ablation.sh ROW [SPLIT] ; SPLIT = dev (default, for choosing) or test (final figures only)
# Environment: INDEX (indexes/shared), LABELS (results/labels), PREFIX (shared), OUT (results/gate_ablation),
#   TIME_ANSWERS (20: questions answered to measure answer time), EXPERTRAG (expertrag),
#   LIMIT (train on the first N training labels only: rows with sample consistency pay ~2 s of sampling per
#   training question on the shared box), POLICIES (adaptive: the row's gate; "all" once, e.g. on row a_query_probe, adds the baselines, whose
#   entropy/flare probe every question one at a time, ~20+ min on the test split of the shared box).
# Summarise rows with: python scripts/gate_ablation_table.py OUT SPLIT
set -euo pipefail
row=${1:?usage: scripts/gate_ablation.sh ROW [dev|test]}
split=${2:-dev}
INDEX=${INDEX:-indexes/shared}
LABELS=${LABELS:-results/labels}
PREFIX=${PREFIX:-shared}
OUT=${OUT:-results/gate_ablation}
TIME_ANSWERS=${TIME_ANSWERS:-20}
EXPERTRAG=${EXPERTRAG:-expertrag}
config=configs/gate_ablation/$row.yaml
[ -f "$config" ] || { echo "no such row: $config" >&2; exit 2; }
mkdir -p "$OUT/$row/$split"
if [ ! -f "$OUT/$row/gate/full.json" ]; then
  $EXPERTRAG train gate --labels "$LABELS/${PREFIX}_train.jsonl" --index "$INDEX" --config "$config" \
    --out "$OUT/$row/gate" ${LIMIT:+--limit "$LIMIT"} --json > "$OUT/$row/train_report.json"
fi
$EXPERTRAG eval-gates --index "$INDEX" --labels "$LABELS/${PREFIX}_${split}.jsonl" --gate "$OUT/$row/gate" \
  --config "$config" --out "$OUT/$row/$split" --time-answers "$TIME_ANSWERS" --policies "${POLICIES:-adaptive}" --json | tail -1 > "$OUT/$row/$split/summary.json"
echo "$row on $split: $OUT/$row/$split/gates.md"
