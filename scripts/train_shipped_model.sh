#!/usr/bin/env bash
# Train the shipped model (rwkv_stream/data/transcript-tagger) from scratch in one command.
#
#   bash scripts/train_shipped_model.sh            # ~60 min on 2 shared CPU cores (50 of them training); rerun to resume after a stop
#
# Steps: build data/corpus from the Debian package r-cran-janeaustenr (scripts/make_corpus.sh), train a
# byte-level BPE and the RWKV-4 model with its punctuation/case tagger and novel classifier
# (`rwkv-stream train --task transcript`), evaluate on the held-out test split, write the bundle (fp16
# weights, checksums, metrics in bundle.json "info"), and store the small held-out sample the tests use.
# The run folder (checkpoints, log.jsonl, metrics.json) is runs/transcript-tagger.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python3
run="${RUN_DIR:-runs/transcript-tagger}"
bundle="${BUNDLE_DIR:-rwkv_stream/data/transcript-tagger}"

[ -f data/corpus/train.books.txt ] || bash scripts/make_corpus.sh

"$py" -m rwkv_stream.cli train --task transcript --corpus data/corpus \
    --vocab-size 2048 --n-embd 192 --n-layer 4 --chunk-len 8 --ctx 128 --batch-size 16 \
    --steps 4000 --max-minutes 50 --lr 1.5e-3 --lr-final 1e-4 --warmup 100 \
    --group 40 --marker-prob 0.5 --eval-group 4 --seed 0 \
    --checkpoint-every 100 --device auto --out "$run" --resume \
    --bundle "$bundle" --name transcript-tagger --model-version "${MODEL_VERSION:-1.0.0}"

"$py" -m rwkv_stream.train.shipped sample "$bundle" data/corpus/test.txt tests/data/transcript_sample.json
"$py" -m rwkv_stream.train.shipped card "$bundle" docs/model-card.md
