#!/usr/bin/env python3
"""Reference for lib/train/optim.c and lr_sched.c (tests/unit/test_optim.c).

Run with tests/reference/.venv (torch 1.13, diffusers 0.10.2):
    tests/reference/.venv/bin/python tests/reference/make_optim_reference.py
writes tests/data/train/optim_reference.safetensors:
  sched.<name>      float64 [STEPS]  lr after k scheduler.step() calls (k = 0..STEPS-1), base lr
                                     LR, warmup 10, total 100 (cosine_with_restarts: 3 cycles,
                                     polynomial: power 2, lr_end 1e-7), from diffusers 0.10.2's
                                     schedule functions on torch's LambdaLR (0.10.2's
                                     get_scheduler cannot pass num_cycles/power; kohya's FEB copy
                                     calls these same functions with them)
  opt.p0            float32 [N]      initial parameters (seeded)
  opt.grads         float32 [K, N]   gradient of each step (seeded)
  opt.<name>        float32 [K, N]   parameters after each of K steps
  bnb.code1, code2  float32 [256]    bitsandbytes 0.35 create_dynamic_map(signed=True/False)
  bnb.p0, bnb.g     float32 [N8]     AdamW8bit run: parameters, gradient (step k uses g * G8[k])
  bnb.p, state1, state2, absmax1, absmax2   after K8 steps (state1/2: uint8 codes)
  opt.adamw8bit_small float32 [K, N] AdamW8bit's fp32-state path (N < 4096) on opt.p0/grads

The AdamW8bit reference is a float32 CPU port of bitsandbytes 0.35's CUDA kernels
kOptimizerStatic8bit2StateBlockwise (block 2048, quantize_2D) and kOptimizer32bit2State (ADAM),
not bitsandbytes itself (it needs CUDA): it pins our reading of the kernels (weight decay after
the update, eps * sqrt(1 - beta2^t), padding of the last block) and the exact quantisation maps.
"""
import math
import os

import torch
from diffusers import optimization as O
from safetensors.torch import save_file

LR, WARMUP, TOTAL, STEPS, CYCLES, POWER = 1e-3, 10, 100, 120, 3, 2.0
N, K = 257, 5
N8, G8 = 4097, (1.0, -0.5, 2.0)   # AdamW8bit: 3 blocks (2048, 2048, 1)


def lrs(make):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=LR)
    s = make(opt)
    out = []
    for _ in range(STEPS):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return torch.tensor(out, dtype=torch.float64)


def lion_step(p, g, m, lr, b1, b2, wd):
    # lion-pytorch update_fn (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms")
    p.mul_(1 - lr * wd)
    update = m.clone().mul_(b1).add(g, alpha=1 - b1).sign_()
    p.add_(update, alpha=-lr)
    m.mul_(b2).add_(g, alpha=1 - b2)


def create_dynamic_map(signed=True, n=7):
    # bitsandbytes 0.35.0 functional.create_dynamic_map, verbatim
    data = []
    additional_items = 2 ** (7 - n) - 1
    if not signed:
        additional_items = 2 * additional_items
    for i in range(n):
        fraction_items = (
            2 ** (i + 7 - n) + 1 if signed else 2 ** (i + 7 - n + 1) + 1
        )
        boundaries = torch.linspace(0.1, 1, fraction_items)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(n - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(n - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(n - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(n - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


F32 = lambda x: torch.tensor(x, dtype=torch.float32)


def quantize_2d(code, x, signed):
    # kernels.cu quantize_2D (QUAD lookups are code[63], code[127], code[191]: the same search)
    x = float(x)
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = (-1.0 if signed else 0.0), 1.0
    val = float(code[127])
    i = 64
    while i > 0:
        if x > val:
            lower_pivot, lower = pivot, val
            pivot += i
        else:
            upper_pivot, upper = pivot, val
            pivot -= i
        val = float(code[pivot])
        i >>= 1
    if x > val:
        mid = float(F32(upper) + F32(val)) * 0.5
        return upper_pivot if x > float(F32(mid)) else pivot
    mid = float(F32(lower) + F32(val)) * 0.5
    return lower_pivot if x < float(F32(mid)) else pivot


def bnb_scalars(lr, b1, b2, eps, wd, step):
    b1f, b2f, lrf, epsf, wdf = F32(b1), F32(b2), F32(lr), F32(eps), F32(wd)
    c1 = F32(1.0) - F32(math.pow(float(b1f), step))
    c2 = torch.sqrt(F32(1.0) - F32(math.pow(float(b2f), step)))
    step_size = (-lrf * c2) / c1
    return b1f, b2f, F32(1.0) - b1f, F32(1.0) - b2f, c2, step_size, epsf, F32(1.0) - lrf * wdf, wdf


def bnb_adam32_step(p, g, s1, s2, lr, b1, b2, eps, wd, step):
    # kOptimizer32bit2State<float, ADAM>
    b1f, b2f, a1, a2, c2, ss, epsf, dec, wdf = bnb_scalars(lr, b1, b2, eps, wd, step)
    s1.copy_(s1 * b1f + a1 * g)
    s2.copy_(s2 * b2f + a2 * (g * g))
    p.copy_(p + (F32(1.0) * ss) * (s1 / (torch.sqrt(s2) + epsf * c2)))
    if float(wdf) > 0:
        p.copy_(p * dec)


def bnb_adam8_step(p, g, c1s, c2s, am1, am2, code1, code2, lr, b1, b2, eps, wd, step, bs=2048):
    # kOptimizerStatic8bit2StateBlockwise<float, ADAM, 2048, 8>
    b1f, b2f, a1, a2, c2, ss, epsf, dec, wdf = bnb_scalars(lr, b1, b2, eps, wd, step)
    n = p.numel()
    for b0 in range(0, n, bs):
        e = min(n, b0 + bs)
        blk = b0 // bs
        gg = torch.zeros(bs)
        gg[: e - b0] = g[b0:e]
        q1 = torch.full((bs,), 128, dtype=torch.long)
        q2 = torch.zeros(bs, dtype=torch.long)
        q1[: e - b0] = c1s[b0:e]
        q2[: e - b0] = c2s[b0:e]
        s1 = code1[q1] * am1[blk]
        s1 = s1 * b1f + a1 * gg
        s2 = code2[q2] * am2[blk]
        s2 = s2 * b2f + (a2 * gg) * gg
        m1, m2 = s1.abs().max(), s2.abs().max()
        am1[blk], am2[blk] = m1, m2
        pv = p[b0:e] + ss * (s1[: e - b0] / (torch.sqrt(s2[: e - b0]) + c2 * epsf))
        if float(wdf) > 0:
            pv = pv * dec
        p[b0:e] = pv
        x1, x2 = s1 / m1, s2 / m2
        for j in range(e - b0):
            c = quantize_2d(code1, x1[j], True)
            if math.copysign(1, float(code1[c])) != math.copysign(1, float(s1[j])):
                c = c + 1 if float(s1[j]) > 0 else c - 1
            c1s[b0 + j] = c & 255
            c2s[b0 + j] = quantize_2d(code2, x2[j], False)


def main():
    t = {}
    t["sched.constant"] = lrs(lambda o: O.get_constant_schedule(o))
    t["sched.constant_with_warmup"] = lrs(lambda o: O.get_constant_schedule_with_warmup(o, WARMUP))
    t["sched.linear"] = lrs(lambda o: O.get_linear_schedule_with_warmup(o, WARMUP, TOTAL))
    t["sched.cosine"] = lrs(lambda o: O.get_cosine_schedule_with_warmup(o, WARMUP, TOTAL))
    t["sched.cosine_with_restarts"] = lrs(
        lambda o: O.get_cosine_with_hard_restarts_schedule_with_warmup(o, WARMUP, TOTAL, num_cycles=CYCLES))
    t["sched.polynomial"] = lrs(
        lambda o: O.get_polynomial_decay_schedule_with_warmup(o, WARMUP, TOTAL, lr_end=1e-7, power=POWER))

    gen = torch.Generator().manual_seed(1234)
    p0 = torch.randn(N, generator=gen, dtype=torch.float32)
    grads = torch.randn(K, N, generator=gen, dtype=torch.float32) * 0.1
    t["opt.p0"], t["opt.grads"] = p0.clone(), grads.clone()

    def run_torch(name, make):
        p = torch.nn.Parameter(p0.clone())
        opt = make([p])
        out = []
        for k in range(K):
            p.grad = grads[k].clone()
            opt.step()
            out.append(p.detach().clone())
        t["opt." + name] = torch.stack(out)

    # kohya SGDNesterov: torch.optim.SGD(nesterov=True, momentum=0.9)
    run_torch("sgd_nesterov", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True))
    run_torch("sgd_momentum_wd", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.1,
                                                            weight_decay=0.01))
    run_torch("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-2))

    with torch.no_grad():
        p, m, out = p0.clone(), torch.zeros(N), []
        for k in range(K):
            lion_step(p, grads[k], m, 1e-2, 0.9, 0.99, 0.1)
            out.append(p.clone())
        t["opt.lion"] = torch.stack(out)

    # AdamW8bit (bitsandbytes 0.35 algorithm; see the docstring)
    code1, code2 = create_dynamic_map(True), create_dynamic_map(False)
    t["bnb.code1"], t["bnb.code2"] = code1, code2
    with torch.no_grad():
        p, s1, s2, out = p0.clone(), torch.zeros(N), torch.zeros(N), []
        for k in range(K):
            bnb_adam32_step(p, grads[k], s1, s2, 1e-2, 0.9, 0.999, 1e-8, 0.01, k + 1)
            out.append(p.clone())
        t["opt.adamw8bit_small"] = torch.stack(out)
        n8 = N8
        p8 = torch.randn(n8, generator=gen, dtype=torch.float32)
        g8 = torch.randn(n8, generator=gen, dtype=torch.float32) * 0.1
        t["bnb.p0"], t["bnb.g"] = p8.clone(), g8.clone()
        c1s, c2s = torch.zeros(n8, dtype=torch.long), torch.zeros(n8, dtype=torch.long)
        nb = (n8 + 2047) // 2048
        am1, am2 = torch.zeros(nb), torch.zeros(nb)
        for k, sc in enumerate(G8):
            bnb_adam8_step(p8, g8 * sc, c1s, c2s, am1, am2, code1, code2, 1e-2, 0.9, 0.999, 1e-8, 0.01, k + 1)
        t["bnb.p"], t["bnb.absmax1"], t["bnb.absmax2"] = p8, am1, am2
        t["bnb.state1"], t["bnb.state2"] = c1s.to(torch.uint8), c2s.to(torch.uint8)

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "train",
                        "optim_reference.safetensors")
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.normpath(path),
              metadata={"generator": "tests/reference/make_optim_reference.py", "torch": torch.__version__})
    print("wrote", os.path.normpath(path), sum(v.numel() * v.element_size() for v in t.values()), "bytes")


if __name__ == "__main__":
    main()
