"""Test data for fedsb's SentencePiece ("llama") GGUF tokenizer (common/src/model/spm.rs), made by the REAL
SentencePiece library.

How to run (needs the `sentencepiece`, `gguf` and `numpy` Python packages):

    pip install sentencepiece gguf numpy
    python scripts/make-spm-test-data.py --out common/tests/data/spm

What it writes, for two tiny SentencePiece BPE models trained here on the text below:

* `llama.gguf`: a Llama-2-like model (`add_dummy_prefix=True`; `<unk>`=0, `<s>`=1, `</s>`=2; no pad);
* `gemma.gguf`: a Gemma-like model (`add_dummy_prefix=False`; `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, a
  `<mask>` control symbol and the user-defined symbols `<start_of_turn>` / `<end_of_turn>`).

Both use byte fallback, the identity normalizer and keep extra whitespace, as Llama-2's and Gemma's tokenizer.model
do. Each GGUF holds only the tokenizer metadata (no tensors), written the way llama.cpp's `convert_hf_to_gguf.py`
(`_set_vocab_sentencepiece`) writes it: model `llama`, pieces, scores, token types (1 normal, 2 unknown, 3 control,
4 user-defined, 5 unused, 6 byte), the special ids, `add_bos_token` / `add_eos_token`, and a chat template.
`gemma.gguf` also sets `add_space_prefix = false` (as llama.cpp's Gemma converter does); `llama.gguf` leaves it and
`add_bos_token` out, so the loader's defaults (true) are exercised.

* `<name>.json`: the cases. For each test string: `ids` (tokens without special tokens), `ids_special` (with the
  BOS that llama.cpp and Hugging Face prepend when `add_bos_token` is true), `decoded` (SentencePiece's decode of
  `ids_special`, unknown tokens left out), `sp_ids` (SentencePiece's plain `encode` of the whole string) and `parses_special`.

`ids` follows llama.cpp's `llama_tokenize(..., parse_special=true)`: the text is first split on the texts of the
control, unknown and user-defined tokens (leftmost-longest), which become their ids, and each remaining fragment is
encoded by SentencePiece on its own (so, with a dummy prefix, each fragment gets its leading "▁", as llama.cpp does).
SentencePiece itself never parses control tokens in input text; for every string that contains no such token text
(`parses_special` false) the script asserts `ids == sp_ids`, i.e. the expectation is SentencePiece's own encoding.

Deterministic: training runs on one thread over the fixed text below, unshuffled.
"""
import argparse
import io
import json
import os
import sys

import numpy as np  # noqa: F401  (gguf needs it; imported here so a missing numpy fails early and clearly)
import sentencepiece as spm
import gguf

# A few KB of varied text: English prose, digits, punctuation, code, accents, Greek, Cyrillic, CJK, emoji, tabs.
CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran away.
Federated learning trains one model on many clients without moving their data to a server.
Each client fine-tunes a small adapter; the server averages the adapters and sends them back.
LoRA-SB trains only a tiny r x r matrix between two frozen projections, so updates stay small.
In 2023 there were 1,234 participants; by 2024 the number grew to 56,789 (an increase of 4502%).
Call 555-0123 before 9:30 a.m. on 12/05/2024, or write to info@example.com with subject "Order #42".
Prices: $19.99, EUR 5,50, 3.14159, 2.71828, 1e-5, -42, +7, 100%, 0.001 and 1/3 are numbers too.
def add(a, b):\treturn a + b  # a tiny Python function with a tab inside
for (int i = 0; i < n; ++i) { sum += x[i] * y[i]; }
if x >= 10 && y != 3 || z == "ok" then print('done!') end
Hello, world! How are you? I'm fine, thanks... and you?! Well -- that's great; really great.
"Quotes", 'apostrophes', (parentheses), [brackets], {braces}, <angles>, and ~tildes~ matter.
Café, naïve, résumé, jalapeño, façade, Übermensch, smörgåsbord, crème brûlée, São Paulo.
El niño comió una manzana y la niña bebió agua. ¿Dónde está la biblioteca? ¡Qué bien!
Der schnelle braune Fuchs springt über den faulen Hund. Größe, Straße, Mädchen, schön.
Le cœur a ses raisons que la raison ne connaît point. Où est la gare ? À bientôt !
Η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο. Καλημέρα κόσμε.
Быстрая коричневая лиса прыгает через ленивую собаку. Привет, мир!
我爱自然语言处理。今天天气很好，我们去公园散步吧。机器学习和深度学习都很有趣。
日本語のテキストも少し入れます。こんにちは、世界！東京は大きな都市です。
한국어 문장도 있습니다. 안녕하세요, 세계!
Emoji are fun 😀 😂 🎉 👍 ❤️ 🚀 and they need bytes when the vocabulary lacks them.
Tabs\tseparate\tcolumns\tin\tTSV\tfiles\tlike\tthis\tone.
Multiple   spaces   between   words   should   be   kept   as   they   are.
  Leading spaces and trailing spaces  
The model answers questions about math: 12 + 30 = 42, 7 * 6 = 42, 84 / 2 = 42, and 6 * 7 is also 42.
Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.
Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs.
James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?
The sky is blue; the grass is green; the sun is bright and the night is dark and quiet.
Training, testing and evaluating: the three stages of building a machine learning system.
Tokenizers split text into pieces; SentencePiece treats the input as a raw stream of characters.
"""

# Strings the tests check. Edge cases: empty, spaces at either end and in runs, newlines, tabs, characters the
# vocabulary lacks (byte fallback), control/user-defined token texts inside the text.
COMMON_CASES = [
    "",
    " ",
    "  ",
    "a",
    "Hello world",
    "Hello, world!",
    " Hello world",
    "Hello world ",
    "   leading and trailing   ",
    "multiple    spaces   here",
    "line one\nline two\n\nline four",
    "\n",
    "\n\nstarts with newlines",
    "ends with a newline\n",
    "tab\tseparated\tvalues",
    "\t\tindented with tabs",
    "The quick brown fox jumps over the lazy dog.",
    "Federated learning with LoRA-SB adapters and 1,234 clients in 2024.",
    "12 + 30 = 42; 3.14159 * 2 = 6.28318",
    "0123456789 9876543210",
    "Café naïve résumé crème brûlée",
    "Größe über Straße",
    "我爱自然语言处理。",
    "机器学习很有趣！",
    "日本語と한국어",
    "Emoji 😀 and 🎉 and 🚀",
    "Unseen: 🦀🐍 ∑∫√ ☃ ß ℃ ﷺ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "Thai ภาษาไทย and Hindi हिन्दी are not in the training text",
    "def add(a, b):\n\treturn a + b",
    "if x >= 10 && y != 3 || z == \"ok\":",
    "<angles> and <s in text",
    "▁ a literal metaspace ▁▁",
    "\u00a0non-breaking\u00a0space\u200bzero-width",
    "a" * 40,
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
]

LLAMA_CASES = COMMON_CASES + [
    "<s>",
    "<s>Hello",
    "Hello <s> world </s>",
    "a</s>b",
    "<s>[INST] What is 2 + 2? [/INST] 4 </s>",
    "<s><s></s>",
    "<unk>",
]

GEMMA_CASES = COMMON_CASES + [
    "<bos>",
    "<bos>Hello",
    "Hello <bos> world <eos>",
    "<start_of_turn>user\nWhat is 2 + 2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
    "<bos><start_of_turn>user\nHi<end_of_turn>",
    "text<mask>more text",
    "<start_of_turn><end_of_turn>",
    "< start_of_turn>",
]

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

MODELS = {
    "llama": dict(
        trainer=dict(
            add_dummy_prefix=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            split_by_whitespace=True,
        ),
        cases=LLAMA_CASES,
        template=LLAMA_TEMPLATE,
        # llama.cpp's Llama converter writes neither; the loader's defaults (both true) apply.
        add_space_prefix=None,
        add_bos=None,
        add_eos=False,
    ),
    "gemma": dict(
        trainer=dict(
            add_dummy_prefix=False,
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            pad_piece="<pad>",
            eos_piece="<eos>",
            bos_piece="<bos>",
            unk_piece="<unk>",
            control_symbols=["<mask>"],
            user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
            # Pieces may span words (as in Gemma's vocabulary), so merges across "▁" are exercised too.
            split_by_whitespace=False,
        ),
        cases=GEMMA_CASES,
        template=GEMMA_TEMPLATE,
        add_space_prefix=False,
        add_bos=True,
        add_eos=False,
    ),
}

# llama.cpp token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def train(trainer_args):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=1000,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=10000,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
        **trainer_args,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def vocab(sp, user_defined):
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        ty = NORMAL
        if sp.is_unknown(i):
            ty = UNKNOWN
        elif sp.is_control(i):
            ty = CONTROL
        elif sp.is_unused(i):
            ty = UNUSED
        elif sp.is_byte(i):
            ty = BYTE
        elif piece in user_defined:
            ty = USER_DEFINED
        tokens.append(piece)
        scores.append(sp.get_score(i))
        types.append(ty)
    return tokens, scores, types


def write_gguf(path, sp, tokens, scores, types, spec):
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    if sp.pad_id() >= 0:
        w.add_pad_token_id(sp.pad_id())
    if spec["add_bos"] is not None:
        w.add_add_bos_token(spec["add_bos"])
    if spec["add_eos"] is not None:
        w.add_add_eos_token(spec["add_eos"])
    if spec["add_space_prefix"] is not None:
        w.add_add_space_prefix(spec["add_space_prefix"])
    w.add_chat_template(spec["template"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def partition(text, specials):
    """Splits `text` on the special texts (leftmost-longest), as llama.cpp's tokenizer_st_partition does."""
    out, start, i = [], 0, 0
    while i < len(text):
        best = None
        for s, sid in specials.items():
            if text.startswith(s, i) and (best is None or len(s) > len(best[0])):
                best = (s, sid)
        if best is None:
            i += 1
            continue
        if i > start:
            out.append(text[start:i])
        out.append(best[1])
        i += len(best[0])
        start = i
    if start < len(text):
        out.append(text[start:])
    return out


def case(sp, text, specials, add_bos, add_eos):
    ids = []
    for frag in partition(text, specials):
        ids.extend([frag] if isinstance(frag, int) else sp.encode(frag))
    sp_ids = sp.encode(text)
    parses_special = any(s in text for s in specials)
    if not parses_special:
        assert ids == sp_ids, (text, ids, sp_ids)
    ids_special = ([sp.bos_id()] if add_bos else []) + ids + ([sp.eos_id()] if add_eos else [])
    return {
        "text": text,
        "ids": ids,
        "ids_special": ids_special,
        # Unknown tokens left out: fedsb (like Hugging Face's Llama tokenizers) registers `<unk>` as a special token,
        # which decoding skips, where SentencePiece writes " ⁇ ". With byte fallback only a literal "<unk>" in the
        # text gives that token.
        "decoded": sp.decode([i for i in ids_special if i != sp.unk_id()]),
        "sp_ids": sp_ids,
        "parses_special": parses_special,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="common/tests/data/spm")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, spec in MODELS.items():
        sp = train(spec["trainer"])
        user_defined = set(spec["trainer"].get("user_defined_symbols", []))
        tokens, scores, types = vocab(sp, user_defined)
        assert all(any(t == ty for t in types) for ty in (NORMAL, UNKNOWN, CONTROL, BYTE)), name
        path = os.path.join(args.out, f"{name}.gguf")
        write_gguf(path, sp, tokens, scores, types, spec)
        specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (UNKNOWN, CONTROL, USER_DEFINED)}
        add_bos = True if spec["add_bos"] is None else spec["add_bos"]
        cases = [case(sp, t, specials, add_bos, spec["add_eos"]) for t in spec["cases"]]
        fallback = sum(any(types[i] == BYTE for i in c["ids"]) for c in cases)
        assert fallback >= 3, f"{name}: only {fallback} cases use byte fallback"
        doc = {
            "about": "made by scripts/make-spm-test-data.py with sentencepiece "
            + spm.__version__
            + "; see that script for what each field means",
            "gguf": f"{name}.gguf",
            "vocab_size": len(tokens),
            "add_bos": add_bos,
            "add_eos": spec["add_eos"],
            "add_space_prefix": spec["trainer"]["add_dummy_prefix"],
            "bos_id": sp.bos_id(),
            "eos_id": sp.eos_id(),
            "unk_id": sp.unk_id(),
            "pad_id": sp.pad_id() if sp.pad_id() >= 0 else None,
            "cases": cases,
        }
        with open(os.path.join(args.out, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, indent=1)
            f.write("\n")
        print(f"{name}: {len(tokens)} tokens, {len(cases)} cases ({fallback} with byte fallback) -> {path}")


if __name__ == "__main__":
    sys.exit(main())
