#!/usr/bin/env python3
"""Independent reference for package ia3's golden test: Hugging Face PEFT's (IA)³ on a tiny
two-layer model, in plain Python (standard library only, float64 arithmetic), written from PEFT
v0.20's src/peft/tuners/ia3/layer.py (Linear.forward and Linear.merge), not from the Go code.

    /usr/bin/python3 ia3/testdata/ia3_reference.py ia3/testdata

The model, in PyTorch's layout (weight [out, in], y = x @ W.T + b):

    h = tanh(up_proj(x))     up_proj   3 -> 4, bias; a target, not feedforward
    y = down_proj(h)         down_proj 4 -> 3, bias; a target and a feedforward module

PEFT's forward: a non-feedforward layer computes base(x) * ia3_l.flatten() (ia3_l [out, 1]), a
feedforward one base(x * ia3_l.flatten()) (ia3_l [1, in]). PEFT's merge: weight * ia3_l (so
[out, 1] scales the rows, the outputs, and [1, in] the columns, the inputs), and for a
non-feedforward layer also bias * ia3_l; each product rounded to float32 as torch.mul does.

It writes:
    golden.json                          inputs, base weights, the vectors, the outputs with and
                                         without the adapter, and PEFT's merged weights
    golden_adapter/adapter_config.json   as PEFT's save_pretrained writes it (sorted keys, indent 2)
    golden_adapter/adapter_model.safetensors
                                         base_model.model.mlp.up_proj.ia3_l [4, 1] and
                                         base_model.model.mlp.down_proj.ia3_l [1, 4], F32,
                                         metadata {"format": "pt"}
"""

import json
import math
import os
import random
import struct
import sys


def f32(x):
    """Rounds a Python float to the nearest float32."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def draw(rng, n, lo, hi):
    return [f32(rng.uniform(lo, hi)) for _ in range(n)]


def matrix(values, rows, cols):
    return [values[r * cols:(r + 1) * cols] for r in range(rows)]


def linear(x, w, b):
    """x [in] @ w.T + b for w [out][in]."""
    return [sum(xi * wi for xi, wi in zip(x, row)) + bj for row, bj in zip(w, b)]


def forward(x, up_w, up_b, up_l, down_w, down_b, down_l):
    up = [v * l for v, l in zip(linear(x, up_w, up_b), up_l)]  # not feedforward: scales outputs
    h = [math.tanh(v) for v in up]
    return linear([v * l for v, l in zip(h, down_l)], down_w, down_b)  # feedforward: scales inputs


def write_safetensors(path, tensors):
    header, data = {}, b""
    for name, shape, values in tensors:
        raw = struct.pack("<%df" % len(values), *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def main(out):
    rng = random.Random(20220511)  # the (IA)³ paper's arXiv date
    n_in, n_hidden, n_out = 3, 4, 3
    up_w = matrix(draw(rng, n_hidden * n_in, -1, 1), n_hidden, n_in)
    up_b = draw(rng, n_hidden, -0.5, 0.5)
    down_w = matrix(draw(rng, n_out * n_hidden, -1, 1), n_out, n_hidden)
    down_b = draw(rng, n_out, -0.5, 0.5)
    # Near 1, as trained vectors are.
    up_l = draw(rng, n_hidden, 0.5, 1.5)
    down_l = draw(rng, n_hidden, 0.5, 1.5)
    x = [matrix(draw(rng, 2 * n_in, -2, 2), 2, n_in) for _ in range(2)]  # [batch 2, seq 2, in 3]

    ones_h = [1.0] * n_hidden
    golden = {
        "x": x,
        "up_proj": {"weight": up_w, "bias": up_b, "ia3_l": up_l},
        "down_proj": {"weight": down_w, "bias": down_b, "ia3_l": down_l},
        "y": [[forward(row, up_w, up_b, up_l, down_w, down_b, down_l) for row in seq] for seq in x],
        "y_base": [[forward(row, up_w, up_b, ones_h, down_w, down_b, ones_h) for row in seq] for seq in x],
        "merged": {
            "up_proj": {
                "weight": [[f32(w * l) for w in row] for row, l in zip(up_w, up_l)],
                "bias": [f32(b * l) for b, l in zip(up_b, up_l)],
            },
            "down_proj": {
                "weight": [[f32(w * l) for w, l in zip(row, down_l)] for row in down_w],
                "bias": down_b,
            },
        },
    }
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")

    adapter = os.path.join(out, "golden_adapter")
    os.makedirs(adapter, exist_ok=True)
    config = {
        "auto_mapping": None, "base_model_name_or_path": None, "exclude_modules": None,
        "fan_in_fan_out": False, "feedforward_modules": ["down_proj"], "inference_mode": True,
        "init_ia3_weights": True, "modules_to_save": None, "peft_type": "IA3", "peft_version": "0.20.0",
        "revision": None, "target_modules": ["down_proj", "up_proj"], "task_type": None,
    }
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True))
    write_safetensors(os.path.join(adapter, "adapter_model.safetensors"), [
        ("base_model.model.mlp.down_proj.ia3_l", [1, n_hidden], down_l),
        ("base_model.model.mlp.up_proj.ia3_l", [n_hidden, 1], up_l),
    ])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
