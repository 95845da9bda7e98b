#!/usr/bin/env python3
"""An independent float64 reference of the decoder families peft/llama runs, written from
Hugging Face transformers' modeling code (modeling_llama.py, modeling_mistral.py,
modeling_qwen2.py, modeling_qwen3.py, modeling_rope_utils.py) in numpy alone, and the generator
of the tiny checkpoints in peft/llama/testdata/families.

    /usr/bin/python3 scripts/family_reference.py            # check stories260K's golden.json, then write the fixtures

It first reproduces stories260K's golden.json (logits at positions 0 and 1 of [1, 403], the
prompt's last logits, the golden sequence's mean loss); only then does it write, for each family,
a tiny random checkpoint in the family's Hugging Face layout (config.json with the fields the
family's transformers config class reads, PyTorch [out, in] tensors, F32) with expected.json: token ids and the logits this
reference computes for them. Needs numpy (Debian: python3-numpy).
"""

import json
import math
import os
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
STORIES = os.path.join(REPO, "peft", "stories260k", "testdata", "stories260K")
OUT = os.path.join(REPO, "peft", "llama", "testdata", "families")


def read_safetensors(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    types = {"F32": "<f4", "F16": "<f2"}
    out = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        out[name] = np.frombuffer(data[b:e], dtype=types[info["dtype"]]).reshape(info["shape"]).astype(np.float64)
    return out


def write_safetensors(path, tensors):
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        data = tensors[name].astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def family(config):
    """The family's differences, as transformers' modeling files have them."""
    kind = config.get("model_type", "llama")
    bias = config.get("attention_bias", False)
    return {
        "qkv_bias": {"llama": bias, "mistral": False, "qwen2": True, "qwen3": bias}[kind],
        "o_bias": {"llama": bias, "mistral": False, "qwen2": False, "qwen3": bias}[kind],
        "mlp_bias": config.get("mlp_bias", False) if kind == "llama" else False,
        "qk_norm": kind == "qwen3",
        # MistralConfig's default is 4096 when the key is absent; null means none.
        "sliding_window": config.get("sliding_window", 4096) if kind == "mistral" else None,
    }


# The defaults of transformers' config classes that differ between families.
DEFAULT_KV_HEADS = {"mistral": 8, "qwen2": 32, "qwen3": 32}
DEFAULT_HEAD_DIM = {"qwen3": 128}


def sizes(config):
    """(heads, kv heads, head dim) with the family's defaults for absent keys."""
    kind = config.get("model_type", "llama")
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", DEFAULT_KV_HEADS.get(kind, heads))
    hd = config.get("head_dim", DEFAULT_HEAD_DIM.get(kind)) or config["hidden_size"] // heads
    return heads, kv, hd


def inv_freq(config, head_dim):
    """modeling_rope_utils: default, linear and llama3 rope types."""
    base = config.get("rope_theta", 10000.0)
    freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    scaling = config.get("rope_scaling")
    if not scaling:
        return freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / freq
        scaled = np.where(wavelen > low_wavelen, freq / factor, freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled)
    raise ValueError(f"rope_type {kind}")


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def forward(config, w, ids):
    """Logits [seq, vocab] of one sequence of token ids."""
    f = family(config)
    heads, kv, hd = sizes(config)
    eps = config["rms_norm_eps"]
    t = len(ids)
    x = w["model.embed_tokens.weight"][ids]
    freq = inv_freq(config, hd)
    angles = np.arange(t, dtype=np.float64)[:, None] * np.concatenate([freq, freq])[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    q_pos, k_pos = np.arange(t)[:, None], np.arange(t)[None, :]
    allowed = k_pos <= q_pos
    if f["sliding_window"]:
        allowed &= k_pos > q_pos - f["sliding_window"]

    def linear(name, v, bias):
        y = v @ w[name + ".weight"].T
        return y + w[name + ".bias"] if bias else y

    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = linear(p + "self_attn.q_proj", h, f["qkv_bias"]).reshape(t, heads, hd)
        k = linear(p + "self_attn.k_proj", h, f["qkv_bias"]).reshape(t, kv, hd)
        v = linear(p + "self_attn.v_proj", h, f["qkv_bias"]).reshape(t, kv, hd)
        if f["qk_norm"]:
            q = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
        q = q * cos[:, None, :] + rotate_half(q) * sin[:, None, :]
        k = k * cos[:, None, :] + rotate_half(k) * sin[:, None, :]
        out = np.zeros((t, heads, hd))
        for hh in range(heads):
            kvh = hh // (heads // kv)
            scores = q[:, hh, :] @ k[:, kvh, :].T / math.sqrt(hd)
            scores = np.where(allowed, scores, -np.inf)
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            out[:, hh, :] = probs @ v[:, kvh, :]
        x = x + linear(p + "self_attn.o_proj", out.reshape(t, heads * hd), f["o_bias"])
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = linear(p + "mlp.gate_proj", h, f["mlp_bias"])
        up = linear(p + "mlp.up_proj", h, f["mlp_bias"])
        x = x + linear(p + "mlp.down_proj", gate / (1 + np.exp(-gate)) * up, f["mlp_bias"])
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ head.T


def check_golden():
    config = json.load(open(os.path.join(STORIES, "config.json")))
    w = read_safetensors(os.path.join(STORIES, "model.safetensors"))
    golden = json.load(open(os.path.join(STORIES, "golden.json")))
    worst = 0.0
    logits = forward(config, w, golden["bos"]["input_ids"])
    worst = max(worst, np.abs(logits[0] - golden["bos"]["logits_pos0"]).max(), np.abs(logits[1] - golden["bos"]["logits_pos1"]).max())
    logits = forward(config, w, golden["prompt"]["input_ids"])
    worst = max(worst, np.abs(logits[-1] - golden["prompt"]["last_logits"]).max())
    ids, targets = golden["loss"]["input_ids"], golden["loss"]["target_ids"]
    logits = forward(config, w, ids)
    logp = logits - logits.max(axis=-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=-1, keepdims=True))
    loss = -np.mean([logp[i, tgt] for i, tgt in enumerate(targets)])
    print(f"stories260K golden: max |logit difference| {worst:.2e}, loss {loss:.12f} (golden {golden['loss']['mean_cross_entropy']:.12f})")
    if worst > 1e-4 or abs(loss - golden["loss"]["mean_cross_entropy"]) > 1e-6:
        sys.exit("the reference does not reproduce golden.json")


# The tiny checkpoints: one per family difference, config.json as transformers writes it.
COMMON = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
          "rms_norm_eps": 1e-6, "hidden_act": "silu", "initializer_range": 0.02, "bos_token_id": 1,
          "attention_dropout": 0.0, "use_cache": True, "torch_dtype": "float32"}
FIXTURES = {
    "llama3": dict(COMMON, architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=500000.0,
                   # With head_dim 8 and theta 5e5 the wavelengths are 6.3, 167, 4443, 118k: with
                   # an original context of 256, one is kept, one interpolated, two scaled.
                   rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 256, "rope_type": "llama3"},
                   head_dim=8, attention_bias=False, mlp_bias=False, pretraining_tp=1,
                   tie_word_embeddings=True, eos_token_id=[2, 3, 4]),
    "llama_linear_bias": dict(COMMON, architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=10000.0,
                              rope_scaling={"factor": 2.0, "rope_type": "linear"}, head_dim=8,
                              attention_bias=True, mlp_bias=True, pretraining_tp=1,
                              tie_word_embeddings=False, eos_token_id=2),
    "qwen2": dict(COMMON, architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1000000.0,
                  rope_scaling=None, tie_word_embeddings=True, use_sliding_window=False, sliding_window=None,
                  max_window_layers=2, eos_token_id=2, bos_token_id=None),
    "qwen3": dict(COMMON, architectures=["Qwen3ForCausalLM"], model_type="qwen3", rope_theta=1000000.0,
                  rope_scaling=None, head_dim=16, attention_bias=False, tie_word_embeddings=True,
                  use_sliding_window=False, sliding_window=None, max_window_layers=2, eos_token_id=2),
    "mistral": dict(COMMON, architectures=["MistralForCausalLM"], model_type="mistral", rope_theta=10000.0,
                    sliding_window=4, head_dim=8, tie_word_embeddings=False, eos_token_id=2),
}


def random_weights(config, rng):
    f = family(config)
    d, ff = config["hidden_size"], config["intermediate_size"]
    heads, kv, hd = sizes(config)
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (config["vocab_size"], d)),
         "model.norm.weight": 1 + rng.normal(0, 0.1, d)}
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = rng.normal(0, 0.2, (config["vocab_size"], d))
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + rng.normal(0, 0.1, d)
        w[p + "post_attention_layernorm.weight"] = 1 + rng.normal(0, 0.1, d)
        shapes = {"self_attn.q_proj": (heads * hd, d), "self_attn.k_proj": (kv * hd, d), "self_attn.v_proj": (kv * hd, d),
                  "self_attn.o_proj": (d, heads * hd), "mlp.gate_proj": (ff, d), "mlp.up_proj": (ff, d), "mlp.down_proj": (d, ff)}
        for name, shape in shapes.items():
            w[p + name + ".weight"] = rng.normal(0, 0.2, shape)
            biased = f["mlp_bias"] if name.startswith("mlp") else (f["o_bias"] if name.endswith("o_proj") else f["qkv_bias"])
            if biased:
                w[p + name + ".bias"] = rng.normal(0, 0.2, shape[0])
        if f["qk_norm"]:
            w[p + "self_attn.q_norm.weight"] = 1 + rng.normal(0, 0.2, hd)
            w[p + "self_attn.k_norm.weight"] = 1 + rng.normal(0, 0.2, hd)
    return {k: v.astype(np.float32).astype(np.float64) for k, v in w.items()}  # what the F32 file holds


def main():
    check_golden()
    ids = [1, 5, 17, 33, 2, 9, 40, 63, 12, 7, 21, 3]
    for name, config in FIXTURES.items():
        rng = np.random.default_rng(sum(map(ord, name)))
        w = random_weights(config, rng)
        folder = os.path.join(OUT, name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        write_safetensors(os.path.join(folder, "model.safetensors"), w)
        logits = forward(config, w, ids)
        with open(os.path.join(folder, "expected.json"), "w") as f:
            json.dump({"input_ids": ids, "logits": logits.tolist()}, f)
        print(f"{name:18s} written: logits range {logits.min():.2f} … {logits.max():.2f}")


if __name__ == "__main__":
    main()
