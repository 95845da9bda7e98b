"""Golden numbers for package combine, from Hugging Face PEFT's own merge rules.

Run with Debian's python3 (torch 1.13, numpy), from the repository root:

    /usr/bin/python3 lora/combine/testdata/gen_golden.py /work/.mirror/huggingface+peft/repo

It copies src/peft/utils/merge_utils.py out of the PEFT git mirror (the file needs only torch),
imports it, and evaluates it in float64 on small fixed tensors: the merge rules themselves
(task_arithmetic, magnitude_prune, ties) and, for whole layers, the two code paths of
LoraModel.add_weighted_adapter (src/peft/tuners/lora/model.py), transcribed below from
_generalized_task_arithmetic_weighted_adapter (A's and B's merged apart with ±sqrt|w·s|) and
_svd_generalized_task_arithmetic_weighted_adapter (updates s·B·A merged with w·s, then SVD).
DARE's random masks are not reproduced (torch.bernoulli); Go tests check their statistics.
Writes lora/combine/testdata/golden.json.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

mirror = sys.argv[1]
commit = subprocess.check_output(["git", "-C", mirror, "rev-parse", "HEAD"], text=True).strip()
source = subprocess.check_output(["git", "-C", mirror, "show", "HEAD:src/peft/utils/merge_utils.py"], text=True)
tmp = tempfile.mkdtemp()
with open(os.path.join(tmp, "merge_utils.py"), "w") as f:
    f.write(source)
spec = importlib.util.spec_from_file_location("merge_utils", os.path.join(tmp, "merge_utils.py"))
mu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mu)

rng = np.random.default_rng(20240607)


def f32(shape):
    """Random values exactly representable in float32, as float64."""
    return rng.standard_normal(shape).astype(np.float32).astype(np.float64)


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def flat(x):
    return [float(v) for v in np.asarray(x).reshape(-1)]


# The merge rules on three [4, 5] task tensors.
tensors = [f32((4, 5)) for _ in range(3)]
weights = [0.7, -0.4, 1.3]
rules = []
for name, rule, density, sign in [
    ("task_arithmetic", "task_arithmetic", None, None),
    ("magnitude_prune 0.3", "magnitude_prune", 0.3, None),
    ("magnitude_prune 0.55", "magnitude_prune", 0.55, None),
    ("ties 0.4 total", "ties", 0.4, "total"),
    ("ties 0.4 frequency", "ties", 0.4, "frequency"),
    ("ties 0.75 total", "ties", 0.75, "total"),
    ("ties 1 frequency", "ties", 1.0, "frequency"),
]:
    ts, ws = [t(x) for x in tensors], t(weights)
    if rule == "task_arithmetic":
        want = mu.task_arithmetic(ts, ws)
    elif rule == "magnitude_prune":
        want = mu.magnitude_prune(ts, ws, density)
    else:
        want = mu.ties(ts, ws, density, sign)
    rules.append({"name": name, "rule": rule, "density": density or 0, "sign": sign or "",
                  "weights": weights, "tensors": [flat(x) for x in tensors], "want": flat(want.numpy())})

# Sign election and disjoint merge alone, with zeros among the entries.
stacked = np.stack(tensors)
stacked[:, 0, 0] = 0
stacked[1, 1, 1] = 0
signs = {}
for method in ["total", "frequency"]:
    mask = mu.calculate_majority_sign_mask(t(stacked), method)
    signs[method] = {"mask": [[bool(v) for v in m.reshape(-1)] for m in mask.numpy()],
                     "disjoint": flat(mu.disjoint_merge(t(stacked) * t(weights).view(3, 1, 1), mask).numpy())}
sign_cases = {"tensors": [flat(x) for x in stacked], "weights": weights, "methods": signs}


# Whole layers: two adapters of rank 3 on a [out 4, in 5] layer.
def adapter(scale):
    return {"A": f32((3, 5)), "B": f32((4, 3)), "scale": scale}


adapters = [adapter(2.0), adapter(0.5)]
layer_weights = [0.8, -0.6]


def generalized(kind, density, sign):
    """_generalized_task_arithmetic_weighted_adapter, on float64 tensors."""
    wa, wb, As, Bs = [], [], [], []
    for a, w in zip(adapters, layer_weights):
        ws = w * a["scale"]
        s = 1 if ws >= 0 else -1
        wa.append(math.sqrt(abs(ws)) * s)
        wb.append(math.sqrt(abs(ws)))
        As.append(t(a["A"]))
        Bs.append(t(a["B"]))
    out = []
    for ts, ws in [(As, t(wa)), (Bs, t(wb))]:
        if kind == "linear":
            out.append(mu.task_arithmetic(ts, ws))
        elif kind == "ties":
            out.append(mu.ties(ts, ws, density, sign))
        elif kind == "magnitude_prune":
            out.append(mu.magnitude_prune(ts, ws, density))
    return out


def svd_path(kind, density, sign, rank):
    """_svd_generalized_task_arithmetic_weighted_adapter without clamping, on float64 tensors."""
    ws = t([w * a["scale"] for a, w in zip(adapters, layer_weights)])
    deltas = [t(a["B"]) @ t(a["A"]) * a["scale"] for a in adapters]  # get_delta_weight
    if kind == "svd":
        delta = mu.task_arithmetic(deltas, ws)
    elif kind == "ties_svd":
        delta = mu.ties(deltas, ws, density, sign)
    elif kind == "magnitude_prune_svd":
        delta = mu.magnitude_prune(deltas, ws, density)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
    B = U[:, :rank] @ torch.diag(S[:rank])
    A = Vh[:rank, :]
    return delta, S, B @ A


layers = []
for kind, density, sign in [("linear", None, None), ("ties", 0.5, "total"), ("ties", 0.6, "frequency"),
                            ("magnitude_prune", 0.5, None)]:
    A, B = generalized(kind, density, sign)
    layers.append({"type": kind, "density": density or 0, "sign": sign or "", "rank": 3,
                   "A": flat(A.numpy()), "B": flat(B.numpy()), "delta": flat((B @ A).numpy())})
for kind, density, sign, rank in [("svd", None, None, 3), ("svd", None, None, 2), ("ties_svd", 0.5, "total", 3),
                                  ("ties_svd", 0.45, "frequency", 2), ("magnitude_prune_svd", 0.7, None, 3)]:
    delta, S, approx = svd_path(kind, density, sign, rank)
    layers.append({"type": kind, "density": density or 0, "sign": sign or "", "rank": rank,
                   "merged": flat(delta.numpy()), "singular_values": flat(S.numpy()), "delta": flat(approx.numpy())})

# torch.quantile (svd_clamp's threshold).
x = f32(23)
quantiles = [{"x": flat(x), "q": q, "want": float(torch.quantile(t(x), q))} for q in [0.0, 0.35, 0.9, 0.99, 1.0]]

out = {
    "provenance": f"lora/combine/testdata/gen_golden.py with PEFT {commit} (src/peft/utils/merge_utils.py imported as is; "
                  f"add_weighted_adapter's two paths transcribed from src/peft/tuners/lora/model.py), torch {torch.__version__}, float64",
    "rules": rules,
    "signs": sign_cases,
    "layer": {"in": 5, "out": 4, "weights": layer_weights,
              "adapters": [{"rank": 3, "scale": a["scale"], "A": flat(a["A"]), "B": flat(a["B"])} for a in adapters],
              "cases": layers},
    "quantiles": quantiles,
}
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden.json")
with open(path, "w") as f:
    json.dump(out, f, indent=1)
    f.write("\n")
print("wrote", path)
