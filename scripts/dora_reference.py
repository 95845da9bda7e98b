#!/usr/bin/env python3
"""DoRA on one linear layer, in PyTorch, written from Hugging Face PEFT's DoraLinearLayer
(src/peft/tuners/lora/dora.py: get_weight_norm, forward) and DoraLinearVariant (variants.py),
PEFT commit 5d602fdb: the golden numbers of lora's TestDoRALayerAgainstPEFTsFormula.

    /usr/bin/python3 scripts/dora_reference.py     # writes lora/testdata/dora_layer.json

PEFT's forward without dropout, for base result y = x·Wᵀ + b:

    weight_norm = ‖W + s·B·A‖ over dim 1 of W [out, in], detached from the gradient
    y' = y + (m / weight_norm − 1)·(y − b) + (m / weight_norm)·s·B(A(x))

The file holds W, b, A, B, m, s and x (float64 values of float32 numbers), the output y' and the
gradients of sum(y' ⊙ c) with respect to A, B and m, computed in float64.
"""

import json
import os

import torch

torch.manual_seed(7)
out_dim, in_dim, r, s = 3, 5, 2, 2.0
dt = torch.float64
W = torch.randn(out_dim, in_dim).float().to(dt)
b = torch.randn(out_dim).float().to(dt)
A = torch.randn(r, in_dim).float().to(dt).requires_grad_()
B = (0.5 * torch.randn(out_dim, r)).float().to(dt).requires_grad_()
m = (torch.linalg.norm(W, dim=1) * (1 + 0.2 * torch.randn(out_dim))).float().to(dt).requires_grad_()
x = torch.randn(4, in_dim).float().to(dt)
c = torch.randn(4, out_dim).float().to(dt)

y = x @ W.T + b
lora_weight = B @ A
weight_norm = torch.linalg.norm(W + s * lora_weight.detach(), dim=1).detach()
gain = (m / weight_norm).view(1, -1)
result = y + (gain - 1) * (y - b) + gain * ((x @ A.T) @ B.T) * s
(result * c).sum().backward()

here = os.path.dirname(os.path.abspath(__file__))
path = os.path.join(here, "..", "lora", "testdata", "dora_layer.json")
flat = lambda t: t.detach().flatten().tolist()
with open(path, "w") as f:
    json.dump({"out": out_dim, "in": in_dim, "r": r, "scale": s,
               "W": flat(W), "b": flat(b), "A": flat(A), "B": flat(B), "m": flat(m), "x": flat(x), "c": flat(c),
               "y": flat(result), "grad_A": flat(A.grad), "grad_B": flat(B.grad), "grad_m": flat(m.grad)}, f, indent=1)
print("wrote", os.path.normpath(path))
