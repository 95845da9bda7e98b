#!/usr/bin/env python3
"""Builds the byte-level BPE tokenizer fixtures in peft/tokenizer/testdata/bytelevel from GPT-2's
tokenizer.json, and scripts/tokenizer_reference.js then writes their reference ids with Hugging
Face's own tokenizers library (npm's `tokenizers`, the Rust implementation).

    python3 scripts/tokenizer_fixtures.py /path/to/gpt2/tokenizer.json
    (cd /tmp/tok && npm install tokenizers@0.23.2) && NODE_PATH=/tmp/tok/node_modules node scripts/tokenizer_reference.js

GPT-2's tokenizer.json (OpenAI's GPT-2 vocabulary, MIT license, in Hugging Face's format; the copy
used is gpt2/tokenizer.json of github.com/itsnsreehari/KV260-Accelerated-Platform at commit
feef3a3c) is cut to its first 4,000 merges (the vocabulary is the 256 byte symbols and what those
merges make, renumbered in order), which keeps a valid BPE of ~100 KB. Four files are written
with the layouts the families use, each section as their real files have it:

  gpt2.json    ByteLevel pre-tokenizer with GPT-2's regex, ByteLevel post-processor and decoder,
               <|endoftext|> (normalized).
  llama3.json  Split with Llama 3's regex (Isolated) then ByteLevel without regex,
               ignore_merges, special tokens <|begin_of_text|> … <|eot_id|> (not normalized),
               post-processor Sequence[ByteLevel, TemplateProcessing("<|begin_of_text|> $A")].
  qwen2.json   NFC normalizer, Split with Qwen2's regex then ByteLevel, <|endoftext|>,
               <|im_start|>, <|im_end|>.
  smollm2.json Digits (each digit alone) then ByteLevel with GPT-2's regex, as SmolLM2.

and gpt2_full.json, the whole GPT-2 file (50,257 tokens, 50,000 merges; truncation set to null).
"""

import json
import os
import sys

MERGES = 4000
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "peft", "tokenizer", "testdata", "bytelevel")

LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def byte_level(add_prefix_space=False, trim_offsets=True, use_regex=True):
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": trim_offsets, "use_regex": use_regex}


def added(i, content, normalized, special=True):
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": normalized, "special": special}


def main():
    gpt2 = json.load(open(sys.argv[1]))
    vocab = gpt2["model"]["vocab"]
    base = [tok for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i < 256]
    merges = gpt2["model"]["merges"][:MERGES]
    small = {tok: i for i, tok in enumerate(base)}
    for merge in merges:
        a, b = merge.split(" ")
        assert a in small and b in small, merge
        if a + b not in small:
            small[a + b] = len(small)
    n = len(small)

    def model(ignore_merges=False):
        return {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                "ignore_merges": ignore_merges, "vocab": small, "merges": merges}

    files = {
        "gpt2.json": {"version": "1.0", "truncation": None, "padding": None,
                      "added_tokens": [added(n, "<|endoftext|>", True)], "normalizer": None,
                      "pre_tokenizer": byte_level(), "post_processor": byte_level(True, False),
                      "decoder": byte_level(True), "model": model()},
        "llama3.json": {"version": "1.0", "truncation": None, "padding": None,
                        "added_tokens": [added(n, "<|begin_of_text|>", False), added(n + 1, "<|end_of_text|>", False),
                                         added(n + 2, "<|start_header_id|>", False), added(n + 3, "<|end_header_id|>", False),
                                         added(n + 4, "<|eot_id|>", False)],
                        "normalizer": None,
                        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
                            byte_level(False, True, False)]},
                        "post_processor": {"type": "Sequence", "processors": [
                            byte_level(True, False, True),
                            {"type": "TemplateProcessing",
                             "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                      {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                             "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [n], "tokens": ["<|begin_of_text|>"]}}}]},
                        "decoder": byte_level(True, True, True), "model": model(ignore_merges=True)},
        "smollm2.json": {"version": "1.0", "truncation": None, "padding": None,
                         "added_tokens": [added(n, "<|endoftext|>", False), added(n + 1, "<|im_start|>", False), added(n + 2, "<|im_end|>", False)],
                         "normalizer": None,
                         "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                             {"type": "Digits", "individual_digits": True}, byte_level(False, True, True)]},
                         "post_processor": byte_level(True, False, True),
                         "decoder": byte_level(True, True, True), "model": model()},
        "qwen2.json": {"version": "1.0", "truncation": None, "padding": None,
                       "added_tokens": [added(n, "<|endoftext|>", False), added(n + 1, "<|im_start|>", False), added(n + 2, "<|im_end|>", False)],
                       "normalizer": {"type": "NFC"},
                       "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                           {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
                           byte_level(False, False, False)]},
                       "post_processor": byte_level(False, False, False),
                       "decoder": byte_level(False, False, False), "model": model()},
    }
    # And the whole of GPT-2's file, its real 50,257-token vocabulary (with truncation off: the
    # copy used sets max_length 50, which Hugging Face's own gpt2 file does not).
    full = dict(gpt2, truncation=None)
    files["gpt2_full.json"] = full
    os.makedirs(OUT, exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(OUT, name), "w", encoding="utf-8") as f:
            json.dump(content, f, ensure_ascii=False, separators=(",", ":"))
        print(f"{name}: {len(content['model']['vocab'])} model tokens, {len(content['model']['merges'])} merges")


if __name__ == "__main__":
    main()
