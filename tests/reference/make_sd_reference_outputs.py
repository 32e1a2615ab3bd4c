#!/usr/bin/env python3
"""Writes tests/data/sd/vN_reference_outputs.safetensors: forward and backward outputs of the
tiny SD v1/v2 models in tests/data/sd/vN_diffusers, for the C text encoder / U-Net / VAE.

Run from anywhere (paths are relative to this file):

    tests/reference/.venv/bin/python tests/reference/make_sd_reference_outputs.py

It only reads the committed diffusers folders (written by make_sd_fixtures.py); it never
writes into them. The float16 weights are cast to float32 (exact) and every computation runs
in float32 on the CPU, one thread, deterministic algorithms, so a rerun writes the same bytes.
torch.baddbmm(empty, q, k, beta=0, alpha) in diffusers' attention is replaced by
baddbmm(zeros, q, k, beta=1, alpha) (see baddbmm_beta0_zeroed: torch 1.13's CPU kernel reads
uninitialised memory there and gives NaN now and then).

Tensors (C order; `ctx` = the text encoder width = the U-Net cross_attention_dim):

  te.input_ids                  int64 [2, 77]: prompt 0 = bos, 5 tokens, eos, then padding to
                                77; prompt 1 = bos, 75 tokens, eos (no padding). bos/eos/pad
                                ids from the text encoder config (0/2/1), tokens in
                                [3, vocab_size). Padding: v1 pads with eos (SD v1's
                                CLIPTokenizer, pad_token <|endoftext|>), v2 with pad_token_id
                                (SD2's tokenizer pads with a separate token, "!").
  te.hidden_states.K            float32 [2, 77, ctx], K = 0..num_hidden_layers
                                (output_hidden_states=True; 0 is the embedding output).
  te.last_hidden_state          final_layer_norm(hidden_states[-1]).
  te.clip_skip2                 final_layer_norm(hidden_states[-2]): kohya's clip_skip=2
                                (for v2 too: the diffusers-form SD2 encoder already drops
                                OpenCLIP's last block, so last_hidden_state is SD2's
                                "penultimate" output and clip_skip=2 goes one layer further).
  unet.sample_in                float32 [2, 4, 8, 8], seeded N(0, 1).
  unet.timesteps                int64 [2] = [1, 999].
  unet.out                      unet(sample_in, timesteps, te.last_hidden_state).sample.
  unet.timestep_int             int64 0-d (500), passed as a Python int (broadcast to the batch).
  unet.out_timestep_int         the output for it.
  unet.timestep_float           float64 0-d (250.5), passed as a Python float.
  unet.out_timestep_float       the output for it.
  unet.loss_weights             float32 [2, 4, 8, 8], seeded N(0, 1): L = sum(unet.out * w).
  unet.loss                     float32 0-d, L.
  unet.grad.sample_in           dL/d sample_in.
  unet.grad.encoder_hidden_states
                                dL/d te.last_hidden_state [2, 77, ctx].
  unet.grad.param.NAME          dL/d the U-Net parameter NAME (diffusers name).
  te.grad.param.NAME            dL/d the text-encoder parameter NAME, L flowing back through
                                the U-Net's encoder_hidden_states into the text encoder (what
                                LoRA training of the text encoder sees); i.e. the text
                                encoder's backward for the upstream gradient
                                unet.grad.encoder_hidden_states.
  vae.image                     float32 [1, 3, 32, 32], seeded uniform in [-1, 1).
  vae.posterior_mean            latent_dist.mean [1, 4, 4, 4].
  vae.posterior_logvar          latent_dist.logvar (clamped to [-30, 20] as diffusers does).
  vae.latent_scaled             posterior_mean * 0.18215.
  vae.decoded                   vae.decode(posterior_mean).sample [1, 3, 32, 32].
  sched.alphas_cumprod          float32 [1000]: DDPMScheduler(num_train_timesteps=1000,
                                scaled_linear, 0.00085..0.012).alphas_cumprod, exactly as
                                diffusers 0.10.2 computes it (betas in float32).
  sched.alphas_cumprod_f64      float64 [1000]: the same formula in float64
                                (betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2,
                                cumprod(1 - betas)).
  sched.x0, sched.noise         float32 [2, 4, 8, 8] (x0 = unet.sample_in; noise seeded N(0,1)).
  sched.timesteps               int64 [2] = [1, 999].
  sched.noisy                   DDPMScheduler.add_noise(x0, noise, timesteps).
  sched.v_target                (v2 only) DDPMScheduler.get_velocity(x0, noise, timesteps) =
                                sqrt(a_t) * noise - sqrt(1 - a_t) * x0.

The metadata has a single key, "liblora_reference" (one key only: safetensors writes metadata
from a hash map, whose order varies between runs), holding a JSON object with the versions,
the seeds, the U-Net parameter and text-encoder parameter names, and a description.
"""
import json
import os

import diffusers
import numpy as np
import safetensors
import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

HERE = os.path.dirname(os.path.abspath(__file__))
SD = os.path.normpath(os.path.join(HERE, "..", "data", "sd"))

F32 = torch.float32
SEEDS = {"v1": 3001, "v2": 3002}
PREDICTION = {"v1": "epsilon", "v2": "v_prediction"}
TIMESTEPS = [1, 999]
TIMESTEP_INT = 500
TIMESTEP_FLOAT = 250.5
N_SHORT, N_LONG = 5, 75          # tokens between bos and eos in the two prompts

# U-Net parameters whose gradient is stored (every kind of layer LoRA touches, plus a few
# outside the transformer blocks). All exist in both versions.
UNET_GRAD_PARAMS = [
    "conv_in.weight",
    "time_embedding.linear_1.weight",
    "down_blocks.0.attentions.0.proj_in.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight",
    "mid_block.attentions.0.proj_out.weight",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0.weight",
    "conv_out.bias",
]


def te_grad_params(n_layers):
    last = n_layers - 1
    return [
        "text_model.encoder.layers.0.self_attn.q_proj.weight",
        "text_model.encoder.layers.0.self_attn.v_proj.bias",
        "text_model.encoder.layers.%d.self_attn.out_proj.weight" % last,
        "text_model.encoder.layers.%d.mlp.fc2.bias" % last,
        "text_model.final_layer_norm.weight",
    ]


_BADDBMM = torch.baddbmm


def baddbmm_beta0_zeroed(input, batch1, batch2, *, beta=1, alpha=1, out=None):
    """torch.baddbmm with its documented beta=0 meaning (`input` ignored), computed as
    baddbmm(zeros, batch1, batch2, beta=1, alpha=alpha) = alpha * batch1 @ batch2.

    torch 1.13's CPU baddbmm with beta=0 does not initialise its result before the kernel
    scales it by beta, for some shapes (seen: [4,4,6] @ [4,6,4] with a transposed batch2, and
    [8,64,k] @ [8,k,1]): whatever NaN/inf the freshly allocated memory (or `input`) holds comes
    out as NaN. diffusers 0.10.2's CrossAttention and AttentionBlock call it with
    torch.empty(...) and beta=0, so without this the U-Net output is NaN now and then, depending
    on what earlier tensors left in the allocator (it happened for v2 after v1 in this script)."""
    if beta == 0:
        input, beta = torch.zeros(input.shape, dtype=input.dtype, device=input.device), 1
    if out is None:
        return _BADDBMM(input, batch1, batch2, beta=beta, alpha=alpha)
    return _BADDBMM(input, batch1, batch2, beta=beta, alpha=alpha, out=out)


def load_f32(ver):
    """The three networks from the committed folder, weights cast float16 -> float32."""
    d = os.path.join(SD, ver + "_diffusers")
    unet = UNet2DConditionModel.from_pretrained(os.path.join(d, "unet"), torch_dtype=torch.float16)
    vae = AutoencoderKL.from_pretrained(os.path.join(d, "vae"), torch_dtype=torch.float16)
    te = CLIPTextModel.from_pretrained(os.path.join(d, "text_encoder"), torch_dtype=torch.float16)
    files = {"unet": os.path.join(d, "unet", "diffusion_pytorch_model.safetensors"),
             "vae": os.path.join(d, "vae", "diffusion_pytorch_model.safetensors"),
             "te": os.path.join(d, "text_encoder", "model.safetensors")}
    for name, m in (("unet", unet), ("vae", vae), ("te", te)):
        m.to(F32)
        m.eval()
        # The loaded float32 weights are exactly the file's float16 weights.
        st = load_file(files[name])
        sd = m.state_dict()
        assert sorted(st) == sorted(sd), (name, set(st) ^ set(sd))
        for k, v in st.items():
            if v.is_floating_point():
                assert v.dtype == torch.float16 and sd[k].dtype == F32, (name, k)
                assert torch.equal(v.to(F32), sd[k]), (name, k)
            else:
                assert torch.equal(v, sd[k]), (name, k)
    return unet, vae, te


def make_input_ids(cfg, gen, pad_id):
    bos, eos, vocab = cfg.bos_token_id, cfg.eos_token_id, cfg.vocab_size
    length = cfg.max_position_embeddings
    assert length == 77 and N_LONG + 2 == length
    specials = {bos, eos, cfg.pad_token_id}
    lo = max(specials) + 1
    rows = []
    for n in (N_SHORT, N_LONG):
        toks = torch.randint(lo, vocab, (n,), generator=gen, dtype=torch.int64).tolist()
        row = [bos] + toks + [eos]
        row += [pad_id] * (length - len(row))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)


def compute(ver):
    unet, vae, te = load_f32(ver)
    tcfg = te.config
    ucfg = unet.config
    ctx = tcfg.hidden_size
    assert ucfg.cross_attention_dim == ctx, (ucfg.cross_attention_dim, ctx)
    gen = torch.Generator().manual_seed(SEEDS[ver])
    out = {}

    # ---- text encoder -------------------------------------------------------------------
    pad_id = tcfg.eos_token_id if ver == "v1" else tcfg.pad_token_id
    ids = make_input_ids(tcfg, gen, pad_id)
    out["te.input_ids"] = ids
    te_out = te(ids, output_hidden_states=True, return_dict=True)
    hs = te_out.hidden_states
    assert len(hs) == tcfg.num_hidden_layers + 1
    last = te_out.last_hidden_state                      # keeps its graph for the backward
    fln = te.text_model.final_layer_norm
    with torch.no_grad():
        assert torch.equal(fln(hs[-1]), last)
        for k, h in enumerate(hs):
            out["te.hidden_states.%d" % k] = h.detach()
        out["te.last_hidden_state"] = last.detach()
        out["te.clip_skip2"] = fln(hs[-2]).detach()
        # the same forward without autograd gives the same numbers
        again = te(ids, output_hidden_states=True, return_dict=True)
        assert torch.equal(again.last_hidden_state, last)

    # ---- U-Net --------------------------------------------------------------------------
    hw = ucfg.sample_size
    sample = torch.randn((2, ucfg.in_channels, hw, hw), generator=gen, dtype=F32)
    weights = torch.randn((2, ucfg.out_channels, hw, hw), generator=gen, dtype=F32)
    timesteps = torch.tensor(TIMESTEPS, dtype=torch.int64)
    out["unet.sample_in"] = sample.clone()
    out["unet.timesteps"] = timesteps.clone()
    out["unet.loss_weights"] = weights.clone()

    params = dict(unet.named_parameters())
    te_params = dict(te.named_parameters())
    te_names = te_grad_params(tcfg.num_hidden_layers)
    for p in list(params.values()) + list(te_params.values()):
        p.grad = None
    x = sample.clone().requires_grad_(True)
    last.retain_grad()
    y = unet(x, timesteps, last).sample
    assert y.shape == sample.shape
    loss = (y * weights).sum()
    loss.backward()
    out["unet.out"] = y.detach()
    out["unet.loss"] = loss.detach().clone()
    out["unet.grad.sample_in"] = x.grad.detach()
    out["unet.grad.encoder_hidden_states"] = last.grad.detach()
    for n in UNET_GRAD_PARAMS:
        g = params[n].grad
        assert g is not None and g.shape == params[n].shape, n
        out["unet.grad.param." + n] = g.detach().clone()
    for n in te_names:
        g = te_params[n].grad
        assert g is not None and g.shape == te_params[n].shape, n
        out["te.grad.param." + n] = g.detach().clone()

    with torch.no_grad():
        ehs = out["te.last_hidden_state"]
        assert torch.equal(unet(sample, timesteps, ehs).sample, out["unet.out"])
        out["unet.timestep_int"] = torch.tensor(TIMESTEP_INT, dtype=torch.int64)
        out["unet.out_timestep_int"] = unet(sample, TIMESTEP_INT, ehs).sample
        out["unet.timestep_float"] = torch.tensor(TIMESTEP_FLOAT, dtype=torch.float64)
        out["unet.out_timestep_float"] = unet(sample, TIMESTEP_FLOAT, ehs).sample

    # ---- VAE ----------------------------------------------------------------------------
    vcfg = vae.config
    with torch.no_grad():
        image = torch.rand((1, vcfg.in_channels, vcfg.sample_size, vcfg.sample_size), generator=gen,
                           dtype=F32) * 2 - 1
        post = vae.encode(image).latent_dist
        out["vae.image"] = image
        out["vae.posterior_mean"] = post.mean.contiguous()
        out["vae.posterior_logvar"] = post.logvar.contiguous()
        out["vae.latent_scaled"] = post.mean.contiguous() * 0.18215
        out["vae.decoded"] = vae.decode(post.mean).sample

    # ---- DDPM scheduler (what kohya's training loop uses) --------------------------------
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, clip_sample=False)
    assert sched.alphas_cumprod.dtype == F32
    out["sched.alphas_cumprod"] = sched.alphas_cumprod.clone()
    betas64 = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    out["sched.alphas_cumprod_f64"] = torch.cumprod(1.0 - betas64, 0)
    noise = torch.randn(sample.shape, generator=gen, dtype=F32)
    out["sched.x0"] = sample.clone()
    out["sched.noise"] = noise
    out["sched.timesteps"] = timesteps.clone()
    out["sched.noisy"] = sched.add_noise(sample, noise, timesteps)
    if PREDICTION[ver] == "v_prediction":
        out["sched.v_target"] = sched.get_velocity(sample, noise, timesteps)

    # the scheduler outputs against the formulas (float32, as diffusers computes them)
    a = out["sched.alphas_cumprod"][timesteps].view(-1, 1, 1, 1)
    assert torch.allclose(out["sched.noisy"], a.sqrt() * sample + (1 - a).sqrt() * noise, rtol=0, atol=1e-6)
    if "sched.v_target" in out:
        assert torch.allclose(out["sched.v_target"], a.sqrt() * noise - (1 - a).sqrt() * sample, rtol=0, atol=1e-6)
    assert torch.allclose(out["sched.alphas_cumprod"].double(), out["sched.alphas_cumprod_f64"], rtol=1e-5, atol=0)

    for k, v in out.items():
        assert v.dtype in (F32, torch.float64, torch.int64), (k, v.dtype)
        assert not v.is_floating_point() or bool(torch.isfinite(v).all()), k
        out[k] = v.detach().contiguous().clone()
    info = {
        "description": ("Reference forward/backward outputs of the tiny SD %s models in %s_diffusers "
                        "(tests/reference/make_sd_reference_outputs.py; tensor list in its docstring and "
                        "tests/reference/README.md)." % (ver, ver)),
        "models": "%s_diffusers (float16 weights cast to float32; all computation in float32 on CPU)" % ver,
        "compute_dtype": "float32",
        "weights_cast": "float16 -> float32",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "safetensors": safetensors.__version__,
                     "numpy": np.__version__},
        "seed": SEEDS[ver],
        "prediction_type": PREDICTION[ver],
        "te": {"bos_token_id": tcfg.bos_token_id, "eos_token_id": tcfg.eos_token_id,
               "pad_token_id": tcfg.pad_token_id, "padding_id_used": pad_id,
               "prompt_tokens": [N_SHORT, N_LONG], "clip_skip2": "final_layer_norm(hidden_states[-2])"},
        "unet": {"encoder_hidden_states": "te.last_hidden_state", "timesteps": TIMESTEPS,
                 "timestep_int": TIMESTEP_INT, "timestep_float": TIMESTEP_FLOAT,
                 "loss": "sum(unet.out * unet.loss_weights)", "grad_params": UNET_GRAD_PARAMS},
        "te_grad": {"loss": "unet.loss, back through encoder_hidden_states", "grad_params": te_names},
        "vae": {"scale_factor": 0.18215, "decoded_from": "vae.posterior_mean"},
        "sched": {"class": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "beta_end": 0.012, "x0": "unet.sample_in"},
    }
    return out, {"liblora_reference": json.dumps(info, sort_keys=True, separators=(",", ":"))}


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.baddbmm = baddbmm_beta0_zeroed
    for ver in ("v1", "v2"):
        tensors, meta = compute(ver)
        path = os.path.join(SD, ver + "_reference_outputs.safetensors")
        save_file(tensors, path, metadata=meta)
        back = load_file(path)
        assert sorted(back) == sorted(tensors)
        for k in back:
            assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k]), k
        print("wrote %s (%d tensors, %d bytes)" % (os.path.relpath(path, os.path.join(HERE, "..", "..")),
                                                   len(tensors), os.path.getsize(path)))


if __name__ == "__main__":
    main()
