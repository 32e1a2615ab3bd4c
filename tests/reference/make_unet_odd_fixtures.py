#!/usr/bin/env python3
"""Writes tests/data/sd/v1_unet_odd_reference.safetensors: diffusers 0.10.2 on the tiny SD v1
model (tests/data/sd/v1_diffusers, 4 U-Net levels, so 8 latents is the 64-pixel multiple) at
latent sizes that are not multiples of 8, for tests/parity/test_unet_odd.c:

    tests/reference/.venv/bin/python tests/reference/make_unet_odd_fixtures.py

At such sizes UNet2DConditionModel.forward sets forward_upsample_size and each non-final
Upsample2D resizes with F.interpolate(size=<next skip's size>, mode="nearest") instead of
scale_factor=2, and each Downsample2D (3x3, stride 2, padding 1) gives ceil(n / 2). Weights
float16 -> float32 (exact), CPU, one thread, deterministic algorithms, torch.baddbmm with beta=0
computed on zeros (see make_sd_reference_outputs.baddbmm_beta0_zeroed).

Tensors (ctx = the U-Net's cross_attention_dim):

  context                       float32 [2, 77, ctx]: te.last_hidden_state of
                                v1_reference_outputs.safetensors (77 tokens).
  timesteps                     int64 [2] = [37, 781].
  HxW.sample_in                 float32 [2, 4, H, W], seeded N(0, 1), for HxW in 9x7, 5x11, 3x3.
  HxW.out                       float32: unet(sample_in, timesteps, context).sample.
  grad.sample_in, grad.context, grad.param.NAME
                                at 9x7, in float64 (the model, sample and context cast to
                                float64; torch autograd): L = sum(out * grad.loss_weights)
                                (grad.loss_weights float32 [2, 4, 9, 7] seeded N(0, 1));
                                dL/d sample_in, dL/d context and dL/d the U-Net parameter NAME
                                (UNET_GRAD_PARAMS below), stored as float32.
  resize.K.x, resize.K.y, resize.K.dy, resize.K.dx
                                F.interpolate(x, size=(oh, ow), mode="nearest") for a few
                                (h, w) -> (oh, ow) in RESIZES (K the index): x float32 [2, 3, h,
                                w] seeded, y its output, dy seeded [2, 3, oh, ow] and dx the
                                autograd input gradient of sum(y * dy).

  pipeline.latents0, pipeline.latents.I, pipeline.image_u8
                                StableDiffusionPipeline at W = 72, H = 56 (latent 9 x 7), DDIM
                                (steps_offset 1, set_alpha_to_one False, clip_sample False), 2
                                steps, guidance 7.5, make_gen_fixtures.PROMPT with NEGATIVE, no
                                network; the text encoder with make_gen_fixtures' formula
                                embedding; latents0 = torch.randn([1, 4, 7, 9],
                                Generator().manual_seed(1234)); latents.I after step I (the
                                callback), image_u8 uint8 [1, 56, 72, 3] as numpy_to_pil rounds.
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import make_gen_fixtures as gen          # noqa: E402  (load_models, PROMPT, NEGATIVE, SEED)
import make_sd_reference_outputs as base  # noqa: E402  (baddbmm_beta0_zeroed, load_f32, SD)

OUT = os.path.join(base.SD, "v1_unet_odd_reference.safetensors")
SEED = 4711
TIMESTEPS = [37, 781]
SIZES = [(9, 7), (5, 11), (3, 3)]
GRAD_SIZE = (9, 7)
UNET_GRAD_PARAMS = [
    "down_blocks.0.attentions.0.proj_in.weight",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0.weight",
]
RESIZES = [((3, 5), (7, 4)), ((2, 3), (3, 5)), ((5, 9), (9, 17)), ((1, 1), (1, 2)), ((4, 4), (8, 8)),
           ((6, 7), (11, 13)), ((7, 5), (3, 2))]
PIPE_W, PIPE_H, PIPE_STEPS = 72, 56, 2


def pipeline(out):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from make_tokenizer_fixtures import reference_tokenizers
    unet, vae, te = gen.load_models("v1")
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                          steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=reference_tokenizers()["v1"], unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents0 = torch.randn((1, 4, PIPE_H // 8, PIPE_W // 8), generator=torch.Generator().manual_seed(gen.SEED))
    out["pipeline.latents0"] = latents0.clone()

    def cb(i, t, latents):
        out["pipeline.latents.%d" % i] = latents.clone()

    with torch.no_grad():
        img = pipe(gen.PROMPT, height=PIPE_H, width=PIPE_W, num_inference_steps=PIPE_STEPS, guidance_scale=7.5,
                   negative_prompt=gen.NEGATIVE, latents=latents0.clone(), output_type="numpy",
                   callback=cb, callback_steps=1).images
    out["pipeline.image_u8"] = torch.from_numpy((img * 255).round().astype("uint8"))


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.baddbmm = base.baddbmm_beta0_zeroed
    unet, _, _ = base.load_f32("v1")
    ref = load_file(os.path.join(base.SD, "v1_reference_outputs.safetensors"))
    context = ref["te.last_hidden_state"].float().contiguous()
    assert context.shape[:2] == (2, 77)
    gen_ = torch.Generator().manual_seed(SEED)
    t = torch.tensor(TIMESTEPS, dtype=torch.int64)
    out = {"context": context.clone(), "timesteps": t.clone()}
    with torch.no_grad():
        for h, w in SIZES:
            x = torch.randn((2, unet.config.in_channels, h, w), generator=gen_, dtype=torch.float32)
            out["%dx%d.sample_in" % (h, w)] = x.clone()
            out["%dx%d.out" % (h, w)] = unet(x, t, encoder_hidden_states=context).sample.clone()
    # the backward in float64
    h, w = GRAD_SIZE
    lw = torch.randn((2, unet.config.out_channels, h, w), generator=gen_, dtype=torch.float32)
    out["grad.loss_weights"] = lw.clone()
    u64 = unet.double()
    params = dict(u64.named_parameters())
    x = out["%dx%d.sample_in" % (h, w)].double().requires_grad_(True)
    c = context.double().requires_grad_(True)
    y = u64(x, t, encoder_hidden_states=c).sample
    (y * lw.double()).sum().backward()
    out["grad.sample_in"] = x.grad.float()
    out["grad.context"] = c.grad.float()
    for n in UNET_GRAD_PARAMS:
        out["grad.param." + n] = params[n].grad.float()
    # the resize op alone
    for k, ((ih, iw), (oh, ow)) in enumerate(RESIZES):
        xr = torch.randn((2, 3, ih, iw), generator=gen_, dtype=torch.float32).requires_grad_(True)
        yr = F.interpolate(xr, size=(oh, ow), mode="nearest")
        dy = torch.randn((2, 3, oh, ow), generator=gen_, dtype=torch.float32)
        (yr * dy).sum().backward()
        out["resize.%d.x" % k] = xr.detach().clone()
        out["resize.%d.y" % k] = yr.detach().clone()
        out["resize.%d.dy" % k] = dy
        out["resize.%d.dx" % k] = xr.grad.clone()
    pipeline(out)
    for k, v in out.items():
        assert not v.is_floating_point() or bool(torch.isfinite(v).all()), k
        out[k] = v.detach().contiguous().clone()
    import diffusers
    info = {"script": "tests/reference/make_unet_odd_fixtures.py", "model": "v1_diffusers (float16 -> float32)",
            "seed": SEED, "timesteps": TIMESTEPS, "sizes": SIZES, "grad_size": GRAD_SIZE, "grad_dtype": "float64",
            "grad_params": UNET_GRAD_PARAMS, "resizes": RESIZES,
            "pipeline": {"width": PIPE_W, "height": PIPE_H, "steps": PIPE_STEPS, "scale": 7.5, "seed": gen.SEED,
                         "prompt": gen.PROMPT, "negative_prompt": gen.NEGATIVE, "sampler": "ddim"},
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}}
    save_file(out, OUT, metadata={"liblora_reference": json.dumps(info, sort_keys=True)})
    print("wrote %s (%d tensors, %d bytes)" % (os.path.relpath(OUT, os.path.join(HERE, "..", "..")), len(out),
                                               os.path.getsize(OUT)))


if __name__ == "__main__":
    main()
