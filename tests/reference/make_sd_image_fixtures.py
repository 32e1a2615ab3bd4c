#!/usr/bin/env python3
"""Writes tests/data/sd/vN_image_outputs.safetensors: U-Net and VAE outputs of the tiny SD
v1/v2 models (tests/data/sd/vN_diffusers) for the shapes make_sd_reference_outputs.py does not
cover: non-square latents, batched integer and float timestep tensors, 77- and 231-token
contexts (kohya's long prompts: 3 x 77), LoRA adapters on transformer targets with their
gradients, and non-square / larger VAE encode and decode.

    tests/reference/.venv/bin/python tests/reference/make_sd_image_fixtures.py

Same conventions as make_sd_reference_outputs.py (float16 weights cast to float32, float32 on
the CPU, one thread, deterministic, the baddbmm(beta=0) workaround). LoRA follows kohya's
LoRAModule (networks/lora.py): y = org(x) + up(down(x)) * multiplier * alpha / rank, down and
up without bias; a 1x1 Conv2d target (v1's proj_in / proj_out) gets 1x1 conv factors. Here
alpha = 1, multiplier = 1, so the scale is 1 / rank.

Tensors (a = case "a", b = case "b"):

  a.sample        float32 [2, 4, 16, 32]   N(0, 1)  (non-square: h 16, w 32)
  a.timesteps     int64 [2] = [10, 700]
  a.context       float32 [2, 77, ctx]      N(0, 1)
  a.out           unet(a.sample, a.timesteps, a.context).sample (no LoRA)
  b.sample        float32 [1, 4, 32, 16]   N(0, 1)  (h 32, w 16)
  b.timesteps     float32 [1] = [333.25]
  b.context       float32 [1, 231, ctx]     N(0, 1)
  b.out           unet(b.sample, b.timesteps, b.context).sample (no LoRA)
  X.lora.K.down / X.lora.K.up   the LoRA factors of target K (LORA_TARGETS order), [r, in], [out, r]
  X.lora_out      the output with the LoRA adapters of LORA_TARGETS attached (computed in
                  float64 from the same float32 values, stored as float32; so are the
                  gradients below)
  X.loss_weights  float32 like X.out, N(0, 1); L = sum(X.lora_out * X.loss_weights)
  X.grad.sample   dL/d X.sample
  b.grad.context  dL/d b.context
  X.grad.lora.K.down, X.grad.lora.K.up   dL/d the LoRA factors
  vae.image       float32 [1, 3, 32, 48] uniform [-1, 1)
  vae.mean, vae.logvar   latent_dist mean / logvar (clamped) [1, 4, 4, 6]
  vae.decoded     vae.decode(vae.mean).sample [1, 3, 32, 48]
  vae.big_latent  float32 [1, 4, 8, 12] N(0, 1)
  vae.big_decoded vae.decode(vae.big_latent).sample [1, 3, 64, 96]
  vae.big_mean    latent_dist.mean of vae.encode(vae.big_decoded) [1, 4, 8, 12]
"""
import copy
import json
import os
import sys

import diffusers
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_sd_reference_outputs as base  # noqa: E402

SD = base.SD
F32 = torch.float32
SEEDS = {"v1": 7101, "v2": 7102}

# (module name, rank): attn2.to_k / to_v read the context, so they see the 231 tokens.
LORA_TARGETS = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 2),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 3),
    ("down_blocks.0.attentions.0.proj_in", 2),
    ("down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v", 2),
    ("down_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj", 2),
    ("mid_block.attentions.0.transformer_blocks.0.ff.net.2", 2),
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0", 3),
    ("up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_v", 2),
    ("up_blocks.3.attentions.2.proj_out", 3),
]


def draw_lora(unet, gen):
    """kohya LoRA factors (float32) for LORA_TARGETS: [(down [r, in], up [out, r], conv)]."""
    mods = dict(unet.named_modules())
    res = []
    for name, r in LORA_TARGETS:
        m = mods[name]
        conv = isinstance(m, torch.nn.Conv2d)
        if conv:
            assert m.kernel_size == (1, 1)
            cin, cout = m.in_channels, m.out_channels
        else:
            cin, cout = m.in_features, m.out_features
        down = (torch.rand((r, cin), generator=gen, dtype=F32) * 2 - 1) * 0.2
        up = (torch.rand((cout, r), generator=gen, dtype=F32) * 2 - 1) * 0.2
        res.append((down, up, conv))
    return res


def lora_backward(unet, lora, sample, timesteps, context, weights, dtype):
    """Attaches the LoRA branch with forward hooks, runs L = sum(unet(...) * weights) and its
    backward in `dtype`; returns (output, d_sample, d_context, [(d_down, d_up)])."""
    mods = dict(unet.named_modules())
    hooks, leaves = [], []
    for (name, r), (down, up, conv) in zip(LORA_TARGETS, lora):
        d = down.to(dtype).requires_grad_(True)
        u = up.to(dtype).requires_grad_(True)

        def hook(mod, inp, out, d=d, u=u, conv=conv, scale=1.0 / r):
            x = inp[0]
            if conv:
                z = F.conv2d(F.conv2d(x, d[:, :, None, None]), u[:, :, None, None])
            else:
                z = F.linear(F.linear(x, d), u)
            return out + z * scale

        hooks.append(mods[name].register_forward_hook(hook))
        leaves.append((d, u))
    x = sample.to(dtype).requires_grad_(True)
    c = context.to(dtype).requires_grad_(True)
    t = timesteps.to(dtype) if timesteps.is_floating_point() else timesteps
    y = unet(x, t, c).sample
    (y * weights.to(dtype)).sum().backward()
    for h in hooks:
        h.remove()
    return y.detach(), x.grad, c.grad, [(d.grad, u.grad) for d, u in leaves]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def unet_case(unet, unet64, gen, out, key, batch, h, w, tokens, timesteps, ctx, ver):
    sample = torch.randn((batch, unet.config.in_channels, h, w), generator=gen, dtype=F32)
    context = torch.randn((batch, tokens, ctx), generator=gen, dtype=F32)
    out[key + ".sample"] = sample
    out[key + ".timesteps"] = timesteps
    out[key + ".context"] = context
    with torch.no_grad():
        out[key + ".out"] = unet(sample, timesteps, context).sample
    lora = draw_lora(unet, gen)
    for i, (down, up, _) in enumerate(lora):
        out["%s.lora.%d.down" % (key, i)] = down
        out["%s.lora.%d.up" % (key, i)] = up
    weights = torch.randn(out[key + ".out"].shape, generator=gen, dtype=F32)
    out[key + ".loss_weights"] = weights
    # The stored outputs and gradients come from float64 (the same float32-valued weights and
    # inputs). torch's own float32 run is compared with them and printed: on these tiny random
    # models float32 round-off alone moves the gradients by up to ~1.6e-4 rel L2 (and up to
    # ~1e-3 with 8x16 latents, whose 1x2 bottom level makes GroupNorm over 12 values), which is
    # why the shapes are 16x32 / 32x16 (test_unet_shapes.c checks ours at 1e-4); a
    # regeneration where torch float32 is off by more than that fails here.
    y, dx, dc, dl = lora_backward(unet64, lora, sample, timesteps, context, weights, torch.float64)
    y32, dx32, dc32, dl32 = lora_backward(unet, lora, sample, timesteps, context, weights, F32)
    errs = [rel(y32, y), rel(dx32, dx), rel(dc32, dc)]
    errs += [rel(a, b) for p, q in zip(dl32, dl) for a, b in zip(p, q)]
    print("%s %s: torch float32 vs float64: out %.1e, d_sample %.1e, d_context %.1e, LoRA worst %.1e" %
          (ver, key, errs[0], errs[1], errs[2], max(errs[3:])))
    assert max(errs) < 2.5e-4, (ver, key, errs)
    out[key + ".lora_out"] = y.to(F32)
    out[key + ".grad.sample"] = dx.to(F32)
    if key == "b":
        out[key + ".grad.context"] = dc.to(F32)
    for i, (d, u) in enumerate(dl):
        out["%s.grad.lora.%d.down" % (key, i)] = d.to(F32)
        out["%s.grad.lora.%d.up" % (key, i)] = u.to(F32)
    # the hooks are gone: the plain forward again
    with torch.no_grad():
        assert torch.equal(unet(sample, timesteps, context).sample, out[key + ".out"])


def compute(ver):
    unet, vae, te = base.load_f32(ver)
    del te
    for p in unet.parameters():
        p.requires_grad_(False)
    unet64 = copy.deepcopy(unet).double()
    ctx = unet.config.cross_attention_dim
    gen = torch.Generator().manual_seed(SEEDS[ver])
    out = {}
    unet_case(unet, unet64, gen, out, "a", 2, 16, 32, 77, torch.tensor([10, 700], dtype=torch.int64), ctx, ver)
    unet_case(unet, unet64, gen, out, "b", 1, 32, 16, 231, torch.tensor([333.25], dtype=F32), ctx, ver)
    with torch.no_grad():
        image = torch.rand((1, 3, 32, 48), generator=gen, dtype=F32) * 2 - 1
        post = vae.encode(image).latent_dist
        out["vae.image"] = image
        out["vae.mean"] = post.mean.contiguous()
        out["vae.logvar"] = post.logvar.contiguous()
        out["vae.decoded"] = vae.decode(post.mean).sample
        lat = torch.randn((1, 4, 8, 12), generator=gen, dtype=F32)
        out["vae.big_latent"] = lat
        dec = vae.decode(lat).sample
        out["vae.big_decoded"] = dec
        out["vae.big_mean"] = vae.encode(dec).latent_dist.mean.contiguous()
    for k, v in out.items():
        assert v.dtype in (F32, torch.int64), (k, v.dtype)
        assert not v.is_floating_point() or bool(torch.isfinite(v).all()), k
        out[k] = v.detach().contiguous().clone()
    info = {
        "description": "tiny SD %s U-Net/VAE image-side fixtures (tests/reference/make_sd_image_fixtures.py)" % ver,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "seed": SEEDS[ver],
        "lora_targets": [[n, r] for n, r in LORA_TARGETS],
        "lora": "y = org(x) + up(down(x)) / rank (alpha 1, multiplier 1)",
        "loss": "sum(X.lora_out * X.loss_weights)",
    }
    return out, {"liblora_reference": json.dumps(info, sort_keys=True, separators=(",", ":"))}


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.baddbmm = base.baddbmm_beta0_zeroed
    for ver in ("v1", "v2"):
        tensors, meta = compute(ver)
        path = os.path.join(SD, ver + "_image_outputs.safetensors")
        save_file(tensors, path, metadata=meta)
        back = load_file(path)
        for k in back:
            assert torch.equal(back[k], tensors[k]), k
        print("wrote %s (%d tensors, %d bytes)" % (path, len(tensors), os.path.getsize(path)))


if __name__ == "__main__":
    main()
