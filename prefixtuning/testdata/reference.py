"""Independent reference for prefixtuning's golden test (run with Debian's /usr/bin/python3:
torch 1.13, numpy; no transformers or peft needed).

It writes a tiny random Llama (2 layers, hidden 16, 4 query heads, 2 key/value heads of width 4)
as a Hugging Face folder tiny/ (config.json, model.safetensors) and golden.json: for prefixes of
P = 1 and 2 positions, the prefix [P, L*2*token_dim] and the logits of the prefix-tuned model on
two sequences (one left-padded), computed the way PEFT and transformers compute them:

- PEFT's get_prompt: prefix.view(batch, P, L*2, kv_heads, head_dim).permute(2, 0, 3, 1, 4)
  .split(2): per layer a (key, value) pair [batch, kv_heads, P, head_dim], handed to the model
  as past_key_values;
- transformers' Llama with a cache of P past positions: cache_position = position_ids =
  arange(P, P+s) for the tokens, rotary applied to the new queries and keys only, the cached
  keys concatenated before the new ones, repeat_kv for grouped-query attention, the causal mask
  in cache positions and PEFT's attention mask [ones(P), mask].
"""
import json
import os
import struct

import numpy as np
import torch

torch.manual_seed(20240501)
HERE = os.path.dirname(os.path.abspath(__file__))
V, D, H, KV, HD, I, L, MAXPOS = 16, 16, 4, 2, 4, 32, 2, 32
EPS, THETA = 1e-5, 10000.0
TD = KV * HD  # PEFT's token_dim after its grouped-query rewrite


def rnd(*shape, std=0.3):
    return (torch.randn(*shape) * std).float()


W = {"model.embed_tokens.weight": rnd(V, D, std=1.0), "model.norm.weight": 1 + rnd(D, std=0.1),
     "lm_head.weight": rnd(V, D)}
for l in range(L):
    p = f"model.layers.{l}."
    W[p + "input_layernorm.weight"] = 1 + rnd(D, std=0.1)
    W[p + "post_attention_layernorm.weight"] = 1 + rnd(D, std=0.1)
    W[p + "self_attn.q_proj.weight"] = rnd(H * HD, D)
    W[p + "self_attn.k_proj.weight"] = rnd(KV * HD, D)
    W[p + "self_attn.v_proj.weight"] = rnd(KV * HD, D)
    W[p + "self_attn.o_proj.weight"] = rnd(D, H * HD)
    W[p + "mlp.gate_proj.weight"] = rnd(I, D)
    W[p + "mlp.up_proj.weight"] = rnd(I, D)
    W[p + "mlp.down_proj.weight"] = rnd(D, I)


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        data = tensors[name].numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def rotate_half(x):
    return torch.cat((-x[..., HD // 2:], x[..., :HD // 2]), dim=-1)


def rope(positions):  # [s] -> cos, sin [1, 1, s, HD]
    inv = 1.0 / (THETA ** (torch.arange(0, HD, 2).float() / HD))
    freqs = positions.float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[None, None], emb.sin()[None, None]


def forward(ids, mask, prefix):
    b, s = ids.shape
    P = prefix.shape[0]
    # PEFT get_prompt
    pkv = prefix.unsqueeze(0).expand(b, -1, -1).reshape(b, P, L * 2, KV, HD).permute(2, 0, 3, 1, 4).split(2)
    positions = torch.arange(P, P + s)  # cache_position = position_ids
    cos, sin = rope(positions)
    full_mask = torch.cat([torch.ones(b, P), mask.float()], dim=1)  # PEFT's attention mask
    q_pos = positions[:, None]
    k_pos = torch.arange(P + s)[None, :]
    allowed = (k_pos <= q_pos)[None, None] & (full_mask[:, None, None, :] > 0)
    bias = torch.where(allowed, torch.tensor(0.0), torch.tensor(torch.finfo(torch.float32).min))
    h = W["model.embed_tokens.weight"][ids]
    for l in range(L):
        p = f"model.layers.{l}."
        x = rms(h, W[p + "input_layernorm.weight"])
        q = (x @ W[p + "self_attn.q_proj.weight"].T).view(b, s, H, HD).transpose(1, 2)
        k = (x @ W[p + "self_attn.k_proj.weight"].T).view(b, s, KV, HD).transpose(1, 2)
        v = (x @ W[p + "self_attn.v_proj.weight"].T).view(b, s, KV, HD).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        past_k, past_v = pkv[l][0], pkv[l][1]  # [b, KV, P, HD], no rotary
        k = torch.cat([past_k, k], dim=2).repeat_interleave(H // KV, dim=1)
        v = torch.cat([past_v, v], dim=2).repeat_interleave(H // KV, dim=1)
        scores = q @ k.transpose(2, 3) / np.sqrt(HD) + bias
        out = torch.softmax(scores, dim=-1) @ v
        out = out.transpose(1, 2).reshape(b, s, H * HD)
        h = h + out @ W[p + "self_attn.o_proj.weight"].T
        x = rms(h, W[p + "post_attention_layernorm.weight"])
        gate = x @ W[p + "mlp.gate_proj.weight"].T
        up = x @ W[p + "mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ W[p + "mlp.down_proj.weight"].T
    return rms(h, W["model.norm.weight"]) @ W["lm_head.weight"].T


os.makedirs(os.path.join(HERE, "tiny"), exist_ok=True)
write_safetensors(os.path.join(HERE, "tiny", "model.safetensors"), W)
config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D, "intermediate_size": I,
          "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV, "vocab_size": V,
          "max_position_embeddings": MAXPOS, "rms_norm_eps": EPS, "rope_theta": THETA, "hidden_act": "silu",
          "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
with open(os.path.join(HERE, "tiny", "config.json"), "w") as f:
    json.dump(config, f, indent=2)

ids = torch.tensor([[3, 7, 1, 12, 5], [0, 9, 4, 4, 15]])
mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
cases = []
with torch.no_grad():
    for P in (1, 2):
        prefix = rnd(P, L * 2 * TD, std=1.0)
        logits = forward(ids, mask, prefix)
        cases.append({"num_virtual_tokens": P, "prefix": prefix.flatten().tolist(),
                      "logits": logits.flatten().tolist()})
golden = {"provenance": "prefixtuning/testdata/reference.py (torch " + torch.__version__ + ")",
          "ids": ids.tolist(), "mask": mask.tolist(), "cases": cases}
with open(os.path.join(HERE, "golden.json"), "w") as f:
    json.dump(golden, f)
