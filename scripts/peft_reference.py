#!/usr/bin/env python3
"""An independent reading of the adapter folders scripts/crosscheck writes, by PEFT's documented
semantics, in plain PyTorch (no transformers, no peft): it runs where Debian's python3-torch is
installed, so the format is checked outside Go on every machine of the project.

    go run ./scripts/crosscheck -write OUT
    /usr/bin/python3 scripts/peft_reference.py OUT --write-py [--peer ../shared/peers/torch_peft_bench.py]
    go run ./scripts/crosscheck -check OUT

For every case in OUT/go/expected.json it loads OUT/base with the PyTorch peer's Llama (Hugging
Face module names), reads the case's adapter_config.json and adapter_model.safetensors, and applies
them as PEFT v0.20 does:

  LORA      target_modules: a string is a full regex over the module path ("all-linear": every
            Linear but lm_head), a list matches a path or its ".name" suffix; rank_pattern and
            alpha_pattern keys match by re.match(rf"(.*\\.)?({key})$") in the file's order (and
            for our files, PEFT's rule up to 0.14 must give the same ranks and alphas);
            W += (lora_alpha / r, or / sqrt(r) with use_rslora) · lora_B.weight @ lora_A.weight;
            with use_dora then W = lora_magnitude_vector · W / ‖W‖ (norm of each row of [out, in]).
  ADALORA   the rank pattern's kept rows are what the file holds;
            W += lora_alpha / (init_r + 1e-5) · lora_B @ (lora_A * lora_E).
  IA3       W and b of a target scaled by its ia3_l [out, 1], or W by [1, in] for a module in
            feedforward_modules (its input scaled).
  PROMPT_TUNING  prompt_embeddings are prepended to the token embeddings; the logits of the real
            positions are compared.

Every tensor of the file must be used. The logits are compared with ours within --tol; exit status
1 if any case fails. With --write-py it also lays out adapters of its own by the same semantics
(OUT/py, with their logits) for scripts/crosscheck -check to load in Go.
"""

import argparse
import importlib.util
import json
import math
import os
import re
import sys

import torch


def load_peer(path):
    spec = importlib.util.spec_from_file_location("torch_peft_bench", path)
    module = importlib.util.module_from_spec(spec)
    argv, sys.argv = sys.argv, [path]  # the peer parses its own flags at import
    try:
        spec.loader.exec_module(module)
    finally:
        sys.argv = argv
    return module


def pattern_value(patterns, path, default):
    for key, value in (patterns or {}).items():  # json.load keeps the file's order
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def pattern_values_before_0_15(config, path):
    """(r, alpha) by PEFT's rule up to 0.14: the first key of rank_pattern then alpha_pattern with
    re.match(rf".*\.{key}$"), else the path itself, looked up in both."""
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    key = next((k for k in list(rank_pattern) + list(alpha_pattern) if re.match(rf".*\.{k}$", path)), path)
    return rank_pattern.get(key, config.get("r", 8)), alpha_pattern.get(key, config.get("lora_alpha", 8))


def is_feedforward(config, path):
    """PEFT's IA3 rule: a string is a full regex over the path, a list names suffixes of it."""
    modules = config.get("feedforward_modules")
    if modules is None:
        modules = ["down_proj"]  # PEFT's default for Llama
    if isinstance(modules, str):
        return re.fullmatch(modules, path) is not None
    return any(path.endswith(name) for name in modules)


def targeted(target_modules, path, is_head):
    if target_modules is None:
        target_modules = ["q_proj", "v_proj"]  # PEFT's default for Llama
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return not is_head
        return re.fullmatch(target_modules, path) is not None
    return any(path == name or path.endswith("." + name) for name in target_modules)


def apply_adapter(model, config, tensors, check_old_rule=False):
    """Applies the adapter to model in place and returns the prompt embeddings (None if none).
    check_old_rule: also require that PEFT's pattern rule up to 0.14 gives every layer the same
    rank and alpha (what our files promise)."""
    used = set()

    def take(key):
        if key not in tensors:
            raise KeyError(f"tensor {key} missing from the file")
        used.add(key)
        return tensors[key].float()

    kind = config["peft_type"]
    prompt = None
    with torch.no_grad():
        if kind in ("LORA", "ADALORA"):
            for path, module in model.named_modules():
                if not isinstance(module, torch.nn.Linear):
                    continue
                if not targeted(config.get("target_modules"), path, path == "lm_head"):
                    continue
                key = "base_model.model." + path
                if kind == "LORA":
                    r = pattern_value(config.get("rank_pattern"), path, config.get("r", 8))
                    alpha = pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", 8))
                    if check_old_rule and (r, alpha) != pattern_values_before_0_15(config, path):
                        raise ValueError(f"{path}: r, alpha = {r}, {alpha} by PEFT's rule since 0.15 but "
                                         f"{pattern_values_before_0_15(config, path)} by the rule up to 0.14")
                    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
                    a, b = take(key + ".lora_A.weight"), take(key + ".lora_B.weight")
                    if a.shape[0] != r or b.shape[1] != r:
                        raise ValueError(f"{key}: rank {a.shape[0]}/{b.shape[1]} in the file, {r} by the config")
                    delta = scale * b @ a
                    if config.get("use_dora"):
                        magnitude = take(key + ".lora_magnitude_vector")
                        adapted = module.weight + delta
                        norm = torch.linalg.norm(adapted, dim=1, keepdim=True)
                        delta = magnitude.unsqueeze(1) * adapted / norm - module.weight
                else:
                    a, e, b = take(key + ".lora_A"), take(key + ".lora_E"), take(key + ".lora_B")
                    delta = config.get("lora_alpha", 8) / (config["init_r"] + 1e-5) * b @ (a * e)
                module.weight += delta
        elif kind == "IA3":
            for path, module in model.named_modules():
                if not isinstance(module, torch.nn.Linear) or not targeted(config.get("target_modules"), path, path == "lm_head"):
                    continue
                vector = take("base_model.model." + path + ".ia3_l")
                if is_feedforward(config, path):  # [1, in]: the layer's input is scaled
                    module.weight *= vector
                else:  # [out, 1]: its output, bias included
                    module.weight *= vector
                    if module.bias is not None:
                        module.bias *= vector.flatten()
        elif kind == "PROMPT_TUNING":
            prompt = take("prompt_embeddings")
        else:
            raise ValueError(f"peft_type {kind} is not covered by this reference")
    left = sorted(set(tensors) - used)
    if left:
        raise ValueError(f"tensors the adapter does not use: {left[:4]}")
    return prompt


def write_safetensors(path, tensors, dtype="F32"):
    """Writes {name: float tensor} as safetensors in dtype (F32, F16 or BF16) with PEFT's metadata."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        t = t.float().contiguous()
        if dtype == "F16":
            data = t.half().numpy().tobytes()
        elif dtype == "BF16":
            data = (t.numpy().view("<u4") >> 16).astype("<u2").tobytes()
        else:
            data = t.numpy().astype("<f4").tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def rounded(t, dtype):
    """t as the file will hold it in dtype."""
    if dtype == "F16":
        return t.half().float()
    if dtype == "BF16":
        return torch.from_numpy(((t.float().numpy().view("<u4") >> 16) << 16).astype("<u4").view("<f4").copy())
    return t.float()


def write_py(peer, out, prompt_ids):
    """Writes adapters laid out by hand to PEFT's semantics into OUT/py with their logits, for
    scripts/crosscheck -check: LoRA in F16 with an overlapping rank_pattern whose file order decides,
    rsLoRA on all linear layers in BF16, DoRA, IA3, AdaLoRA with a rank pattern, prompt tuning."""
    torch.manual_seed(0)
    base = peer.LlamaForCausalLM.from_pretrained(os.path.join(out, "base"))
    linears = {p: m for p, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    cases = {
        "ref_lora_f16_patterns": ({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
                                   "target_modules": ["q_proj", "v_proj", "down_proj"],
                                   # layers\.1\..* comes first: it wins on layer 1's v_proj over v_proj
                                   "rank_pattern": {"layers\\.1\\..*": 2, "v_proj": 6}, "alpha_pattern": {"down_proj": 3}}, "F16"),
        "ref_rslora_all_linear_bf16": ({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 16,
                                        "use_rslora": True, "target_modules": "all-linear"}, "BF16"),
        "ref_dora": ({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "use_dora": True,
                      "target_modules": ["k_proj", "o_proj", "up_proj"]}, "F32"),
        "ref_ia3": ({"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": ["k_proj", "v_proj", "down_proj", "up_proj"],
                     "feedforward_modules": ["down_proj", "up_proj"]}, "F32"),
        "ref_adalora": ({"peft_type": "ADALORA", "task_type": "CAUSAL_LM", "init_r": 4, "target_r": 2, "lora_alpha": 6,
                         "total_step": 10, "target_modules": ["q_proj", "v_proj"],
                         "rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [True, False, True, False]}}, "F32"),
        "ref_prompt_tuning": ({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3,
                               "token_dim": 64, "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM"}, "F32"),
    }
    expected = {}
    for name, (config, dtype) in cases.items():
        tensors = {}
        if config["peft_type"] == "PROMPT_TUNING":
            tensors["prompt_embeddings"] = rounded(torch.randn(3, 64), dtype)
        for path, module in linears.items():
            if config["peft_type"] == "PROMPT_TUNING" or not targeted(config["target_modules"], path, path == "lm_head"):
                continue
            out_dim, in_dim = module.weight.shape
            key = "base_model.model." + path
            if config["peft_type"] == "IA3":
                shape = (1, in_dim) if is_feedforward(config, path) else (out_dim, 1)
                tensors[key + ".ia3_l"] = rounded(1 + 0.2 * torch.randn(*shape), dtype)
            elif config["peft_type"] == "LORA":
                r = pattern_value(config.get("rank_pattern"), path, config["r"])
                tensors[key + ".lora_A.weight"] = rounded(0.1 * torch.randn(r, in_dim), dtype)
                tensors[key + ".lora_B.weight"] = rounded(0.1 * torch.randn(out_dim, r), dtype)
                if config.get("use_dora"):
                    norms = torch.linalg.norm(module.weight.detach(), dim=1)
                    tensors[key + ".lora_magnitude_vector"] = rounded(norms * (1 + 0.1 * torch.randn(out_dim)), dtype)
            else:
                kept = sum(config["rank_pattern"].get(path + ".lora_E", [True] * config["init_r"]))
                tensors[key + ".lora_A"] = 0.3 * torch.randn(kept, in_dim)
                tensors[key + ".lora_E"] = torch.randn(kept, 1)
                tensors[key + ".lora_B"] = 0.3 * torch.randn(out_dim, kept)
        model = peer.LlamaForCausalLM.from_pretrained(os.path.join(out, "base")).eval()
        prompt = apply_adapter(model, config, tensors)
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            if prompt is None:
                logits, _ = model(input_ids=ids)
            else:
                logits, _ = model(inputs_embeds=torch.cat([prompt.unsqueeze(0), model.model.embed_tokens(ids)], dim=1))
        logits = logits[0, -len(prompt_ids):]
        folder = os.path.join(out, "py", name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        write_safetensors(os.path.join(folder, "adapter_model.safetensors"), tensors, dtype)
        expected[name] = {"prompt_ids": prompt_ids, "logits": logits.flatten().tolist(), "vocab": logits.shape[-1]}
        print(f"{name:24s} written to {folder}")
    with open(os.path.join(out, "py", "expected.json"), "w") as f:
        json.dump(expected, f)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the folder scripts/crosscheck -write filled")
    parser.add_argument("--peer", default=os.path.join(here, "..", "..", "shared", "peers", "torch_peft_bench.py"),
                        help="the PyTorch peer's torch_peft_bench.py (its Llama and safetensors reader)")
    parser.add_argument("--tol", type=float, default=1e-4, help="largest absolute logit difference accepted")
    parser.add_argument("--write-py", action="store_true",
                        help="also write hand-laid PEFT folders to OUT/py for scripts/crosscheck -check")
    args = parser.parse_args()
    peer = load_peer(args.peer)
    expected = json.load(open(os.path.join(args.out, "go", "expected.json")))
    if args.write_py:
        write_py(peer, args.out, next(iter(expected.values()))["prompt_ids"])
    failed = 0
    for name, exp in sorted(expected.items()):
        folder = os.path.join(args.out, "go", name)
        model = peer.LlamaForCausalLM.from_pretrained(os.path.join(args.out, "base")).eval()
        config = json.load(open(os.path.join(folder, "adapter_config.json")))
        tensors, meta = peer.read_safetensors(os.path.join(folder, "adapter_model.safetensors"))
        try:
            if meta.get("format") != "pt":
                raise ValueError(f"metadata format {meta.get('format')!r}, PEFT writes 'pt'")
            prompt = apply_adapter(model, config, tensors, check_old_rule=True)
            ids = torch.tensor([exp["prompt_ids"]])
            with torch.no_grad():
                if prompt is None:
                    logits, _ = model(input_ids=ids)
                else:
                    embeds = torch.cat([prompt.unsqueeze(0), model.model.embed_tokens(ids)], dim=1)
                    logits, _ = model(inputs_embeds=embeds)
            got = logits[0, -len(exp["prompt_ids"]):].float()
            want = torch.tensor(exp["logits"]).view(len(exp["prompt_ids"]), exp["vocab"])
            diff = (got - want).abs().max().item()
            status = "ok" if diff <= args.tol else "FAIL"
            print(f"{name:24s} {status}: max |logit difference| {diff:.3g} ({config['peft_type']}, {len(tensors)} tensors)")
        except Exception as e:
            status = "FAIL"
            print(f"{name:24s} FAIL: {type(e).__name__}: {e}")
        failed += status != "ok"
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
