"""A tiny random Gemma-2 and its reference outputs from Hugging Face transformers, for tests/gemma2.rs.

Writes tests/data/gemma2-tiny/:
  hf/                 a Hugging Face folder: config.json, model.safetensors (f32), tokenizer.json,
                      tokenizer_config.json (a real Gemma-style tokenizer: sentencepiece BPE with byte fallback,
                      converted by transformers' GemmaTokenizer)
  gemma2-tiny.gguf    the same model as GGUF (f32), written the way llama.cpp's convert_hf_to_gguf.py writes
                      Gemma2ForCausalLM: MODEL_ARCH.GEMMA2 tensor names, every `*norm.weight` stored as w + 1,
                      no lm_head (tied), Q/K not permuted, gemma2.* metadata, the sentencepiece vocabulary as
                      tokenizer.ggml.model = "llama" (tokens, scores, token types, special ids)
  reference.json      transformers' (eager attention, f32, CPU) logits slices and mean next-token NLL of fixed
                      token-id sequences, alone and as one right-padded batch with an attention mask; the
                      tokenizer's ids of a few texts (sentencepiece itself and transformers agree on them)

How to run (CPU is enough; torch, transformers 5, gguf, sentencepiece, safetensors):

    /root/torchref/venv/bin/python scripts/make-gemma2-test-model.py --out tests/data/gemma2-tiny

Deterministic: the weights come from a seeded torch generator, the tokenizer from a single-threaded sentencepiece
training on a generated corpus. The sizes are chosen so the Gemma-2 specifics matter: head_dim 16 with 4 heads
(64 ≠ hidden 48), 2 kv heads, sliding window 8 < the 20-token sequence,
attention soft-cap 5 and final soft-cap 3 (the script checks that raw scores and logits exceed them), norm
weights far from 0. query_pre_attn_scalar is head_dim (16), as in Gemma-2 2B and 9B: GGUF has no key for it and
llama.cpp scales by head_dim^-0.5 (hidden/heads for the 27B), so the GGUF means the same model only then. The
reference also holds transformers' outputs of the same weights with query_pre_attn_scalar 24 (`scalar_24`), which
the Rust test checks on a copy of the folder whose config.json says 24.
"""
import argparse
import json
import os
import random
import shutil
import tempfile

import torch

SEED = 20260517
VOCAB = 384
WORDS = (
    "the a an of to in and is was for on with as by at from that this it be are were not but or "
    "model data train loss learn rank adapter gradient federated client server round update matrix "
    "small large fast slow good bad new old first last red blue green one two three four five "
    "tensor weight layer norm head token window cap gemma llama query key value attention"
).split()
TEXTS = [
    "the model is trained on the data",
    "Federated clients send a small update every round.",
    "gemma  uses a sliding window; 12345 tokens, ünïcödé and emoji 🙂!",
    "<start_of_turn>user\nhello<end_of_turn>\n",
]
SEQS = [
    [2, 17, 250, 33, 99, 4, 281, 300, 12, 57, 58, 200, 201, 7, 145, 319, 64, 90, 91, 13],
    [2, 5, 18, 260, 77, 77, 300, 42, 11, 150, 210, 3, 99],
    [2, 301, 9, 140, 66, 120, 8],
]
POSITIONS = [0, 5, 8, 12, 19]
# google/gemma-2-9b-it's chat template.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)


def rounded(t):
    """A tensor's values at 8 significant digits (f32 precision, shorter JSON)."""
    return [float(f"{x:.8g}") for x in t.tolist()]


def corpus(n, rng):
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randint(0, len(words)), str(rng.randint(0, 99999)))
        line = " ".join(words)
        if rng.random() < 0.5:
            line = line.capitalize() + "."
        lines.append(line)
    return lines


def train_tokenizer(workdir):
    """A sentencepiece BPE model with Gemma's trainer settings (byte fallback, no dummy prefix, split digits,
    whitespace-only pieces, identity normalization) and Gemma's first ids."""
    import sentencepiece as spm

    rng = random.Random(SEED)
    path = os.path.join(workdir, "corpus.txt")
    with open(path, "w") as f:
        f.write("\n".join(corpus(3000, rng)) + "\n")
    spm.SentencePieceTrainer.train(
        input=path,
        model_prefix=os.path.join(workdir, "tokenizer"),
        model_type="bpe",
        vocab_size=VOCAB,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        num_threads=1,
        minloglevel=2,
    )
    return os.path.join(workdir, "tokenizer.model")


def hf_tokenizer(sp):
    """transformers' GemmaTokenizer on the sentencepiece vocabulary, merges recovered from it as
    SentencePieceExtractor does (`generate_merges`: no protobuf needed), control and user-defined pieces as
    special added tokens (GemmaConverter), and Gemma-2's chat template."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    tok = GemmaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_bos_token=True, add_eos_token=False)
    specials = [sp.id_to_piece(i) for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)]
    specials += ["<start_of_turn>", "<end_of_turn>"]
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, normalized=False, special=True) for t in specials]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation="eager",
    )
    model = Gemma2ForCausalLM(cfg).eval().to(torch.float32)
    g = torch.Generator().manual_seed(SEED)
    std = {"embed_tokens": 0.25, "q_proj": 0.2, "k_proj": 0.2, "v_proj": 0.2, "o_proj": 0.2, "mlp": 0.2, "norm": 0.3}
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = next((k for k in std if k in name), None)
            assert key is not None, name
            p.copy_(torch.randn(p.shape, generator=g) * std[key])
    return model


@torch.no_grad()
def references(model):
    out = {"single": [], "batch": None, "positions": POSITIONS}
    for ids in SEQS:
        x = torch.tensor([ids])
        res = model(input_ids=x, labels=x)
        logits = res.logits[0]
        out["single"].append(
            {
                "ids": ids,
                "mean_nll": float(res.loss),
                "logits": {str(p): rounded(logits[p]) for p in POSITIONS if p < len(ids)},
            }
        )
    t = max(len(s) for s in SEQS)
    ids = torch.tensor([s + [0] * (t - len(s)) for s in SEQS])
    mask = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in SEQS])
    labels = ids.masked_fill(mask == 0, -100)
    res = model(input_ids=ids, attention_mask=mask, labels=labels)
    out["batch"] = {
        "ids": ids.tolist(),
        "mask": mask.tolist(),
        "mean_nll": float(res.loss),
        "logits": [
            {str(p): rounded(res.logits[b, p]) for p in POSITIONS if p < len(SEQS[b])} for b in range(len(SEQS))
        ],
    }
    # The same weights with query_pre_attn_scalar 24 (every attention's scaling changed).
    for layer in model.model.layers:
        layer.self_attn.scaling = 24**-0.5
    ids = SEQS[0]
    x = torch.tensor([ids])
    res = model(input_ids=x, labels=x)
    out["scalar_24"] = {
        "ids": ids,
        "mean_nll": float(res.loss),
        "logits": {str(p): rounded(res.logits[0, p]) for p in POSITIONS},
    }
    for layer in model.model.layers:
        layer.self_attn.scaling = model.config.query_pre_attn_scalar**-0.5
    return out


@torch.no_grad()
def raw_score_stats(model):
    """Largest |q·k·scale| per layer before soft-capping, and the largest |logit| before the final cap."""
    cfg = model.config
    x = torch.tensor([SEQS[0]])
    h = model.model.embed_tokens(x)
    pos = torch.arange(x.shape[1])[None]
    cos, sin = model.model.rotary_emb(h, pos)
    from transformers.models.gemma2.modeling_gemma2 import apply_rotary_pos_emb

    stats = []
    outs = model(input_ids=x, output_hidden_states=True)
    for i, layer in enumerate(model.model.layers):
        hs = layer.input_layernorm(outs.hidden_states[i])
        q = layer.self_attn.q_proj(hs).view(1, -1, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = layer.self_attn.k_proj(hs).view(1, -1, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, dim=1)
        stats.append(float((q @ k.transpose(2, 3) * cfg.query_pre_attn_scalar**-0.5).abs().max()))
    hidden = model.model(input_ids=x).last_hidden_state
    raw_logits = model.lm_head(hidden)
    return stats, float(raw_logits.abs().max())


def write_gguf(model, tokenizer_model, path):
    """llama.cpp's convert_hf_to_gguf.py `Gemma2Model`, in miniature (f32, no quantization)."""
    import gguf
    import sentencepiece as spm

    cfg = model.config
    arch = gguf.MODEL_ARCH.GEMMA2
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    w.add_name("gemma2-tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_sliding_window(cfg.sliding_window)
    # Vocabulary: `_set_vocab_sentencepiece` (+ add_space_prefix False, as for Gemma-2).
    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif sp.id_to_piece(i) in ("<start_of_turn>", "<end_of_turn>"):
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied; llama.cpp skips it
        data = t.detach().to(torch.float32)
        if name.endswith("norm.weight"):
            data = data + 1
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        w.add_tensor(new, data.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/data/gemma2-tiny")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    import sentencepiece as spm

    hf = os.path.join(args.out, "hf")
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(hf)
    with tempfile.TemporaryDirectory() as tmp:
        tok_model = train_tokenizer(tmp)
        sp = spm.SentencePieceProcessor(model_file=tok_model)
        tok = hf_tokenizer(sp)
        model = build_model()
        model.save_pretrained(hf, safe_serialization=True)
        tok.save_pretrained(hf)
        for extra in ["tokenizer.model", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja"]:
            p = os.path.join(hf, extra)
            if os.path.exists(p):
                os.remove(p)
        # The chat template inside tokenizer_config.json, as google/gemma-2-9b-it publishes it (transformers 5
        # writes chat_template.jinja instead).
        with open(os.path.join(hf, "tokenizer_config.json")) as f:
            tc = json.load(f)
        tc["chat_template"] = CHAT_TEMPLATE
        with open(os.path.join(hf, "tokenizer_config.json"), "w") as f:
            json.dump(tc, f, indent=2)
        ref = references(model)
        ref["tokenizer"] = []
        for text in TEXTS:
            ids_sp = sp.encode(text)
            ids_hf = tok(text, add_special_tokens=False)["input_ids"]
            if "<start_of_turn>" not in text:
                assert ids_sp == ids_hf, (text, ids_sp, ids_hf)
            ref["tokenizer"].append({"text": text, "ids": ids_hf})
        scores, max_logit = raw_score_stats(model)
        ref["raw_max_abs_attention_score_per_layer"] = scores
        ref["raw_max_abs_logit"] = max_logit
        assert min(scores) > 5.0 and max_logit > 3.0, (scores, max_logit)
        write_gguf(model, tok_model, os.path.join(args.out, "gemma2-tiny.gguf"))
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump(ref, f)
    sizes = {n: os.path.getsize(os.path.join(dp, n)) for dp, _, fs in os.walk(args.out) for n in fs}
    print(json.dumps({"sizes": sizes, "raw_scores": scores, "raw_max_logit": max_logit}, indent=1))


if __name__ == "__main__":
    main()
