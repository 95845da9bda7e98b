#!/usr/bin/env python3
"""Cross-check of this SDK's adapter folders against Hugging Face transformers and PEFT.

The Python half of scripts/crosscheck (see its doc comment). It needs torch, transformers, peft
and safetensors, which the project's GPU machine has (CPU is enough: stories260K is tiny):

    go run ./scripts/crosscheck -write OUT      # on a machine with Go
    python3 scripts/hf_crosscheck.py OUT        # here
    go run ./scripts/crosscheck -check OUT      # back where Go is

1. For every adapter in OUT/go (saved by peft.Model.Save on stories260K), load OUT/base with
   transformers, apply the folder with PeftModel.from_pretrained, check that PEFT took every
   tensor of the file (and nothing else), and compare the logits of the prompt with ours
   (OUT/go/expected.json) within --tol.
2. Save adapters made by PEFT itself to OUT/py/<case> (LoRA with random B, rsLoRA with rank and
   alpha patterns on all linear layers, a BF16 LoRA, AdaLoRA with a rank pattern, prompt tuning)
   with their logits in OUT/py/expected.json, for scripts/crosscheck -check.

Results are printed and written to OUT/hf_crosscheck.json; the exit status is 1 if any check
failed.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never ask the Hub

import torch
import peft
import transformers
from peft import (AdaLoraConfig, LoraConfig, PeftModel, PromptTuningConfig, get_peft_model,
                  get_peft_model_state_dict)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def base_model(out):
    path = os.path.join(out, "base")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # transformers ≥ 4.56
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    return model.eval()


def prompt_logits(model, ids):
    """Logits [len(ids), vocab] of the prompt; prompt tuning's virtual positions are dropped."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return logits[-len(ids):]


def check_ours(out, tol):
    expected = json.load(open(os.path.join(out, "go", "expected.json")))
    results = {}
    for name, exp in sorted(expected.items()):
        folder = os.path.join(out, "go", name)
        try:
            model = PeftModel.from_pretrained(base_model(out), folder).eval()
            # PEFT silently ignores unexpected keys: check it took exactly the file's tensors.
            saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
            loaded = get_peft_model_state_dict(model, save_embedding_layers=False)
            if set(saved) != set(loaded):
                raise ValueError(f"keys differ: only in file {sorted(set(saved) - set(loaded))}, "
                                 f"only in PEFT {sorted(set(loaded) - set(saved))}")
            for key, value in saved.items():
                if not torch.equal(value.float(), loaded[key].float().cpu()):
                    raise ValueError(f"tensor {key} differs after loading")
            got = prompt_logits(model, exp["prompt_ids"])
            want = torch.tensor(exp["logits"]).view(len(exp["prompt_ids"]), exp["vocab"])
            diff = (got - want).abs().max().item()
            ok = diff <= tol
            results[name] = {"ok": ok, "max_abs_diff": diff}
        except Exception as e:  # report and go on with the other cases
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(f"ours -> PEFT  {name:24s} {results[name]}")
    return results


def peft_adapters():
    """The adapters PEFT makes for us to load: name -> (config, dtype)."""
    return {
        "lora": (LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                            init_lora_weights=False), torch.float32),
        "lora_rslora_patterns": (LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=16, use_rslora=True,
                                            target_modules="all-linear", rank_pattern={"down_proj": 2},
                                            alpha_pattern={"o_proj": 4}, init_lora_weights=False), torch.float32),
        "lora_bf16": (LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["k_proj", "o_proj"],
                                 init_lora_weights=False), torch.bfloat16),
        "adalora": (AdaLoraConfig(task_type="CAUSAL_LM", init_r=4, target_r=2, total_step=10,
                                  target_modules=["q_proj", "v_proj"]), torch.float32),
        "prompt_tuning": (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), torch.float32),
    }


def write_peft(out, prompt_ids):
    torch.manual_seed(0)
    expected, results = {}, {}
    for name, (config, dtype) in peft_adapters().items():
        folder = os.path.join(out, "py", name)
        try:
            model = get_peft_model(base_model(out), config).eval()
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if not p.requires_grad:
                        continue
                    if "lora_E" in pname:  # AdaLoRA starts with E = 0: make the adapter act
                        p.copy_(torch.randn_like(p))
                    if dtype != torch.float32:  # the values the BF16 file will hold
                        p.copy_(p.to(dtype).float())
            if name == "adalora":
                # A rank pattern as AdaLoRA's allocator leaves it: masked E entries zero, the file
                # cut to the kept ones (resize_state_dict_by_rank_pattern).
                pattern = {}
                with torch.no_grad():
                    for pname, p in model.named_parameters():
                        if "lora_E" in pname:
                            keep = torch.tensor([True, False, True, True]) if "layers.0." in pname else torch.ones(4, dtype=torch.bool)
                            p.masked_fill_(~keep.view(-1, 1), 0.0)
                            key = pname.replace("base_model.model.", "").replace(".default", "")
                            pattern[key] = keep.tolist()
                model.peft_config["default"].rank_pattern = pattern
            logits = prompt_logits(model, prompt_ids)
            if dtype != torch.float32:
                for pname, p in model.named_parameters():
                    if p.requires_grad:
                        p.data = p.data.to(dtype)
            model.save_pretrained(folder)
            expected[name] = {"prompt_ids": prompt_ids, "logits": logits.flatten().tolist(), "vocab": logits.shape[-1]}
            results[name] = {"ok": True, "folder": folder}
        except Exception as e:
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(f"PEFT -> ours  {name:24s} {results[name]}")
    os.makedirs(os.path.join(out, "py"), exist_ok=True)
    with open(os.path.join(out, "py", "expected.json"), "w") as f:
        json.dump(expected, f)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the folder scripts/crosscheck -write filled")
    parser.add_argument("--tol", type=float, default=1e-4, help="largest absolute logit difference accepted")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    ours = check_ours(args.out, args.tol)
    prompt_ids = next(iter(json.load(open(os.path.join(args.out, "go", "expected.json"))).values()))["prompt_ids"]
    theirs = write_peft(args.out, prompt_ids)
    report = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
              "ours_in_peft": ours, "peft_written": theirs}
    with open(os.path.join(args.out, "hf_crosscheck.json"), "w") as f:
        json.dump(report, f, indent=2)
    ok = all(r["ok"] for r in list(ours.values()) + list(theirs.values()))
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
