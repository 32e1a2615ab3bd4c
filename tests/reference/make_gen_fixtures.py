#!/usr/bin/env python3
"""Fixtures for the generation tests (tests/parity/test_samplers.c, test_generate.c), made with
diffusers 0.10.2's own schedulers and StableDiffusionPipeline and kohya-ss sd-scripts'
networks/lora.py (commit 75d1883, unpacked outside the project):

    tests/reference/.venv/bin/python tests/reference/make_gen_fixtures.py --kohya /tmp/kohya-full

Models: the tiny committed SD v1 (epsilon) and v2 (v-prediction) diffusers folders, weights cast
float16 -> float32 (exact), CPU, one thread. The tiny text encoders have 256/288-token
vocabularies, so, as in make_encode_prompt_reference.py, their token embedding is replaced by a
49408-row table E[r, c] = (((r * 31 + c * 17) % 97) - 48) / 64 that the C test rebuilds.

Writes tests/data/gen/:

  samplers_v1.safetensors, samplers_v2.safetensors
      For every scheduler class kohya's gen_img_diffusers.py maps its sampler names to, built
      with the settings liblora uses (1000 steps, scaled_linear 0.00085..0.012, the model's
      prediction type; DDIM and PNDM with steps_offset 1 and set_alpha_to_one False, DDIM
      clip_sample False ("ddim") and True ("ddim_clip", kohya's forced setting), PNDM with
      skip_prk_steps True ("pndm", SD's config) and False ("pndm_prk", the class default kohya
      gets), DPMSolverMultistep with algorithm_type dpmsolver / dpmsolver++): a STEPS-step run of
      the pipeline loop (scale_model_input, U-Net, step) on the tiny U-Net with a fixed random
      conditioning and no guidance. Ancestral noise as kohya supplies it: torch.manual_seed(seed),
      the initial latent, then STEPS * k per-step noises drawn in order (k = 2 for dpm_2_a), handed
      to the scheduler module's torch.randn one per call. Per sampler S and U-Net call i:
        S.t.i      float64 0-d: the timestep passed to the U-Net
        S.in.i     float32 [1, 4, 8, 8]: the scaled model input
        S.out.i    float32: the U-Net output
        S.prev.i   float32: the scheduler's prev_sample
      plus S.init (the initial latent times init_noise_sigma) and S.calls (int64 0-d). Shared:
      latent0 (torch.randn([1, 4, 8, 8]) of the seed), context [1, 77, ctx].

  pipeline_v1.safetensors, pipeline_v2.safetensors
      StableDiffusionPipeline, DDIM (steps_offset 1, set_alpha_to_one False, clip_sample False),
      4 steps, guidance 7.5, PROMPT with NEGATIVE, and the committed kohya LoRA
      (tests/data/network/vN_kohya.safetensors) applied with create_network_from_weights(1.0,
      ...) + apply_to + load_state_dict at multiplier 1 (text encoder and U-Net):
        latents0   float32 [1, 4, H/8, W/8]: torch.randn(generator=Generator().manual_seed(SEED))
        latents.i  after step i (the pipeline's callback)
        image      float32 [1, H, W, 3] in [0, 1] (decode_latents), image_u8 uint8 as
                   numpy_to_pil rounds it
      v1 at 64x64, v2 at W=64, H=128 (non-square). Also randn_seed_S.N: torch.randn(N) of seed S
      for a few shapes (the CPU generator check); pyrandom_seed_S int64 [4]: random.seed(S) then
      random.randint(0, 0x7fffffff) four times (kohya's per-image seeds for --seed S).

  init_v1.png, img2img_v1.safetensors
      img2img on the tiny v1 model (no LoRA) from a 64x64 seeded pattern (init_v1.png, written
      once with PIL), PROMPT / NEGATIVE, CFG 7.5, 4 steps: for "ddim" at strength 0.6 and
      "euler_a" at strength 0.5, the steps StableDiffusionImg2ImgPipeline.get_timesteps picks,
      the init latents 0.18215 * (posterior mean + std * eps) noised by scheduler.add_noise at
      the first of them, with the noises in liblora's order (manual_seed(SEED): start code,
      STEPS * k sampler noises, img2img noise, VAE sample noise). Per sampler S:
        S.latents_start, S.latents.i (after each call), S.image_u8.
"""
import argparse
import json
import os
import sys
import types

import numpy as np
import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
SD = os.path.join(ROOT, "tests", "data", "sd")
OUT = os.path.join(ROOT, "tests", "data", "gen")
sys.path.insert(0, HERE)

VOCAB = 49408
STEPS = 4
SEED = 1234
PROMPT = "a photo of a cat, masterpiece"
NEGATIVE = "blurry, lowres"
SIZES = {"v1": (64, 64), "v2": (64, 128)}     # (W, H)
PRED = {"v1": "epsilon", "v2": "v_prediction"}


def formula_embedding(hidden):
    r = torch.arange(VOCAB, dtype=torch.int64).unsqueeze(1)
    c = torch.arange(hidden, dtype=torch.int64).unsqueeze(0)
    return (((r * 31 + c * 17) % 97) - 48).to(torch.float32) / 64.0


def load_models(ver):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    d = os.path.join(SD, ver + "_diffusers")
    unet = UNet2DConditionModel.from_pretrained(os.path.join(d, "unet"), torch_dtype=torch.float16).float().eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(d, "vae"), torch_dtype=torch.float16).float().eval()
    te = CLIPTextModel.from_pretrained(os.path.join(d, "text_encoder"), torch_dtype=torch.float16).float().eval()
    emb = torch.nn.Embedding(VOCAB, te.config.hidden_size)
    emb.weight.data = formula_embedding(te.config.hidden_size)
    te.text_model.embeddings.token_embedding = emb
    te.config.vocab_size = VOCAB
    return unet, vae, te


SAMPLERS = ["ddim", "ddim_clip", "pndm", "pndm_prk", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a",
            "dpmsolver", "dpmsolver++", "dpmsingle"]


def make_scheduler(name, pred):
    import diffusers
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler,
                           EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                           KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LMSDiscreteScheduler,
                           PNDMScheduler)
    S = diffusers.schedulers
    base = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type=pred)
    k = 1
    if name in ("ddim", "ddim_clip"):
        s = DDIMScheduler(clip_sample=name == "ddim_clip", set_alpha_to_one=False, steps_offset=1, **base)
        mod = S.scheduling_ddim
    elif name in ("pndm", "pndm_prk"):
        s = PNDMScheduler(skip_prk_steps=name == "pndm", set_alpha_to_one=False, steps_offset=1, **base)
        mod = S.scheduling_pndm
    elif name == "lms":
        s, mod = LMSDiscreteScheduler(**base), S.scheduling_lms_discrete
    elif name == "euler":
        s, mod = EulerDiscreteScheduler(**base), S.scheduling_euler_discrete
    elif name == "euler_a":
        s, mod = EulerAncestralDiscreteScheduler(**base), S.scheduling_euler_ancestral_discrete
    elif name == "heun":
        s, mod = HeunDiscreteScheduler(**base), S.scheduling_heun_discrete
    elif name == "dpm_2":
        s, mod = KDPM2DiscreteScheduler(**base), S.scheduling_k_dpm_2_discrete
    elif name == "dpm_2_a":
        s, mod = KDPM2AncestralDiscreteScheduler(**base), S.scheduling_k_dpm_2_ancestral_discrete
        k = 2
    elif name in ("dpmsolver", "dpmsolver++"):
        s = DPMSolverMultistepScheduler(algorithm_type=name, **base)
        mod = S.scheduling_dpmsolver_multistep
    elif name == "dpmsingle":
        s, mod = DPMSolverSinglestepScheduler(**base), S.scheduling_dpmsolver_singlestep
    else:
        raise ValueError(name)
    return s, mod, k


class NoiseFeed:
    """kohya's NoiseManager: the scheduler module's torch.randn hands out pre-drawn noises."""

    def __init__(self, noises):
        self.noises, self.i = noises, 0

    def randn(self, shape, device=None, dtype=None, layout=None, generator=None):
        assert self.i < len(self.noises), "more noise requests than kohya pre-draws"
        n = self.noises[self.i]
        assert tuple(shape) == tuple(n.shape)
        self.i += 1
        return n.clone()


class TorchProxy:
    def __init__(self, feed):
        self.feed = feed

    def __getattr__(self, item):
        if item == "randn":
            return self.feed.randn
        return getattr(torch, item)


def sampler_fixtures(ver, unet):
    out = {}
    shape = (1, 4, 8, 8)
    g = torch.Generator().manual_seed(SEED + 7)
    ctx_dim = unet.config.cross_attention_dim
    context = torch.randn((1, 77, ctx_dim), generator=g) * 0.5
    out["context"] = context
    meta = {}
    for name in SAMPLERS:
        sched, mod, k = make_scheduler(name, PRED[ver])
        torch.manual_seed(SEED)
        latent0 = torch.randn(shape)
        noises = [torch.randn(shape) for _ in range(STEPS * k)]
        out["latent0"] = latent0
        feed = NoiseFeed(noises)
        saved = mod.torch
        mod.torch = TorchProxy(feed)
        try:
            sched.set_timesteps(STEPS)
            lat = latent0 * sched.init_noise_sigma
            out[name + ".init"] = lat.clone()
            calls = 0
            for i, t in enumerate(sched.timesteps):
                x = sched.scale_model_input(lat, t)
                with torch.no_grad():
                    eps = unet(x, t, encoder_hidden_states=context).sample
                lat = sched.step(eps, t, lat).prev_sample
                out["%s.t.%d" % (name, i)] = torch.tensor(float(t), dtype=torch.float64)
                out["%s.in.%d" % (name, i)] = x.clone()
                out["%s.out.%d" % (name, i)] = eps.clone()
                out["%s.prev.%d" % (name, i)] = lat.clone()
                calls += 1
            out[name + ".calls"] = torch.tensor(calls, dtype=torch.int64)
            meta[name] = {"calls": calls, "noises_used": feed.i, "init_noise_sigma": float(sched.init_noise_sigma)}
        finally:
            mod.torch = saved
    return out, meta


def pipeline_fixture(ver, kohya, unet, vae, te):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from make_tokenizer_fixtures import reference_tokenizers
    import lora
    tok = reference_tokenizers()[ver]
    net_path = os.path.join(ROOT, "tests", "data", "network", ver + "_kohya.safetensors")
    net = lora.create_network_from_weights(1.0, net_path, vae, te, unet)
    net.apply_to(te, unet)
    net.to(torch.float32)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                          steps_offset=1, prediction_type=PRED[ver])
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    W, H = SIZES[ver]
    latents0 = torch.randn((1, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(SEED))
    out = {"latents0": latents0.clone()}

    def cb(i, t, latents):
        out["latents.%d" % i] = latents.clone()
        out["t.%d" % i] = torch.tensor(int(t), dtype=torch.int64)

    with torch.no_grad():
        img = pipe(PROMPT, height=H, width=W, num_inference_steps=STEPS, guidance_scale=7.5,
                   negative_prompt=NEGATIVE, latents=latents0.clone(), output_type="numpy",
                   callback=cb, callback_steps=1).images
    out["image"] = torch.from_numpy(np.ascontiguousarray(img)).float()
    out["image_u8"] = torch.from_numpy((img * 255).round().astype("uint8"))
    return out


def img2img_fixture(ver, sampler, strength):
    """diffusers 0.10.2 img2img, steps as StableDiffusionImg2ImgPipeline.get_timesteps gives them,
    with liblora's (kohya's) noise order: manual_seed(SEED), start code (unused), STEPS * k
    sampler noises, the img2img noise, then the noise of the VAE posterior sample."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image
    from make_tokenizer_fixtures import reference_tokenizers
    unet, vae, te = load_models(ver)
    tok = reference_tokenizers()[ver]
    W, H = 64, 64
    path = os.path.join(OUT, "init_%s.png" % ver)
    if not os.path.exists(path):
        g = torch.Generator().manual_seed(SEED + 11)
        yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        base = torch.stack([xx * 4, yy * 4, (xx + yy) * 2], -1).float()
        img = (base + torch.randint(0, 32, (H, W, 3), generator=g)).clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(img, "RGB").save(path)
    image = Image.open(path).convert("RGB")
    arr = np.array(image).astype(np.float32) / 255.0
    x = torch.from_numpy(2.0 * arr[None].transpose(0, 3, 1, 2) - 1.0)
    sched, mod, k = make_scheduler(sampler, PRED[ver])
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    shape = (1, 4, H // 8, W // 8)
    torch.manual_seed(SEED)
    torch.randn(shape)                                   # start code
    noises = [torch.randn(shape) for _ in range(STEPS * k)]
    i2i = torch.randn(shape)
    vae_eps = torch.randn(shape)
    out = {}
    with torch.no_grad():
        emb = pipe._encode_prompt(PROMPT, torch.device("cpu"), 1, True, NEGATIVE)
        sched.set_timesteps(STEPS)
        timesteps, n = pipe.get_timesteps(STEPS, strength, torch.device("cpu"))
        post = vae.encode(x).latent_dist
        init = 0.18215 * (post.mean + post.std * vae_eps)
        lat = sched.add_noise(init, i2i, timesteps[:1])
        out["latents_start"] = lat.clone()
        feed = NoiseFeed(noises)
        saved = mod.torch
        mod.torch = TorchProxy(feed)
        try:
            for i, t in enumerate(timesteps):
                inp = sched.scale_model_input(torch.cat([lat] * 2), t)
                eps = unet(inp, t, encoder_hidden_states=emb).sample
                u, c = eps.chunk(2)
                eps = u + 7.5 * (c - u)
                lat = sched.step(eps, t, lat).prev_sample
                out["latents.%d" % i] = lat.clone()
        finally:
            mod.torch = saved
        img = pipe.decode_latents(lat)
    out["image_u8"] = torch.from_numpy((img * 255).round().astype("uint8"))
    info = {"sampler": sampler, "strength": strength, "steps": STEPS, "seed": SEED, "calls": len(timesteps),
            "prompt": PROMPT, "negative_prompt": NEGATIVE, "scale": 7.5, "init_image": "init_%s.png" % ver}
    return out, info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kohya", required=True)
    a = ap.parse_args()
    lib = types.ModuleType("library")
    lib.__path__ = [os.path.join(a.kohya, "library")]
    tu = types.ModuleType("library.train_util")     # lora.py imports it; nothing used here
    tu.precalculate_safetensors_hashes = lambda *a, **k: (None, None)
    sys.modules["library"] = lib
    sys.modules["library.train_util"] = tu
    sys.path.insert(0, os.path.join(a.kohya, "networks"))
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    import make_sd_reference_outputs as base
    torch.baddbmm = base.baddbmm_beta0_zeroed
    os.makedirs(OUT, exist_ok=True)
    for ver in ("v1", "v2"):
        unet, vae, te = load_models(ver)
        samp, meta = sampler_fixtures(ver, unet)
        info = {"steps": STEPS, "seed": SEED, "prediction_type": PRED[ver], "samplers": meta}
        save_file({k: v.contiguous() for k, v in samp.items()}, os.path.join(OUT, "samplers_%s.safetensors" % ver),
                  metadata={"liblora_reference": json.dumps(info, sort_keys=True)})
        pipe = pipeline_fixture(ver, a.kohya, unet, vae, te)
        if ver == "v1":
            for s, n in ((0, 16), (42, 100), (1234, 256), (4294967295, 7)):
                pipe["randn_seed_%d.%d" % (s, n)] = torch.randn(n, generator=torch.Generator().manual_seed(s))
            import random
            for s in (0, 1234, 2 ** 40 + 5):   # kohya's per-image seeds: random.seed(S), randint(0, 2^31 - 1)
                random.seed(s)
                pipe["pyrandom_seed_%d" % s] = torch.tensor([random.randint(0, 0x7fffffff) for _ in range(4)],
                                                           dtype=torch.int64)
        W, H = SIZES[ver]
        info = {"steps": STEPS, "seed": SEED, "prompt": PROMPT, "negative_prompt": NEGATIVE, "scale": 7.5,
                "width": W, "height": H, "prediction_type": PRED[ver], "network": ver + "_kohya.safetensors",
                "network_mul": 1.0}
        save_file({k: v.contiguous() for k, v in pipe.items()}, os.path.join(OUT, "pipeline_%s.safetensors" % ver),
                  metadata={"liblora_reference": json.dumps(info, sort_keys=True)})
        if ver == "v1":
            tens, infos = {}, []
            for sampler, strength in (("ddim", 0.6), ("euler_a", 0.5)):
                o, info = img2img_fixture(ver, sampler, strength)
                tens.update({"%s.%s" % (sampler, k): v for k, v in o.items()})
                infos.append(info)
            save_file({k: v.contiguous() for k, v in tens.items()}, os.path.join(OUT, "img2img_v1.safetensors"),
                      metadata={"liblora_reference": json.dumps(infos, sort_keys=True)})
            print("wrote img2img_v1.safetensors", os.path.getsize(os.path.join(OUT, "img2img_v1.safetensors")))
        for f in ("samplers_%s.safetensors" % ver, "pipeline_%s.safetensors" % ver):
            print("wrote", f, os.path.getsize(os.path.join(OUT, f)), "bytes")


if __name__ == "__main__":
    main()
