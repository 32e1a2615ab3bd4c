#!/usr/bin/env python3
"""Writes tiny Stable Diffusion v1/v2 checkpoints in tests/data/sd for the key-map tests.

Run from anywhere (paths are relative to this file):

    tests/reference/.venv/bin/python tests/reference/make_sd_fixtures.py

The three networks are built with diffusers 0.10.2 / transformers 4.25.1 (requirements.txt),
so every diffusers-side name and shape is what those libraries produce. The models are tiny
(a few hundred kB) but keep the exact SD key structure: 4 U-Net levels with channel pattern
c,2c,4c,4c (so the same resnets carry a conv_shortcut as in SD), cross-attention in levels
0-2, 2 resnets per down block, 4 VAE levels, a CLIP text encoder. Every parameter is
re-initialised from a seeded generator (norm weights around 1, biases around 0, never exactly
1 or 0) so that a dropped or swapped tensor is noticed.

For each version V in v1, v2 it writes, under tests/data/sd/:
  V_diffusers/                 model_index.json, scheduler/scheduler_config.json,
                               unet/ vae/ (config.json, diffusion_pytorch_model.safetensors and,
                               v1 only, diffusion_pytorch_model.bin),
                               text_encoder/ (config.json, model.safetensors, v1: pytorch_model.bin);
                               all written by save_pretrained (safe_serialization=True for the
                               .safetensors files). No tokenizer (the vocabulary is not the
                               real one, see below). v2 has no .bin copies, to keep the folder
                               small; the v1 ones cover the pickle variant.
  V_ldm.safetensors            the same weights under the LDM (CompVis) names kohya reads, made
                               by the diffusers -> LDM conversion written out in this file from
                               spec/kohya-lora.md section 3, plus a few extra keys a real
                               checkpoint carries (DDPM buffer, EMA entries) that must survive.
  V_ldm.ckpt                   the same dict as a torch pickle {'state_dict', 'epoch', 'global_step'}.
  expected_keys_V.json         for unet/vae/te the sorted diffusers keys with shape and dtype,
                               the mapping LDM key -> diffusers key(s) computed here, the LDM
                               keys that have no diffusers name ("extra"), and the configs.

Deviations from the real models, all on purpose: widths are tiny, the CLIP vocabulary has
256 (v1) and 288 (v2) entries instead of 49408, the MLP is 2x instead of 4x wide, weights are float16 (the
DDPM/EMA extras stay float32/int32 as in real fp16 checkpoints).
"""
import json
import math
import os
import re
import shutil
import tempfile

import numpy as np
import torch
import diffusers
import transformers
import safetensors
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.normpath(os.path.join(HERE, "..", "data", "sd"))

DTYPE = torch.float16

# ---- configurations --------------------------------------------------------------------------
CH = (4, 8, 12, 12)          # SD: 320, 640, 1280, 1280 (same pattern: c0 < c1 < c2 = c3)
VAE_CH = (2, 4, 6, 6)        # SD: 128, 256, 512, 512
GROUPS = 2                   # SD: 32

UNET_COMMON = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=CH, layers_per_block=2, norm_num_groups=GROUPS,
)
VERSIONS = {
    "v1": dict(
        seed=1001,
        # diffusers 0.10 `attention_head_dim` is the number of heads (spec 3.4)
        unet=dict(UNET_COMMON, attention_head_dim=2, cross_attention_dim=32),
        te=dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                layer_norm_eps=1e-5, projection_dim=32),
        prediction_type="epsilon",
        bin=True,    # diffusers folder with both .bin and .safetensors weights
    ),
    "v2": dict(
        seed=2002,
        unet=dict(UNET_COMMON, attention_head_dim=[2, 2, 4, 4], cross_attention_dim=48,
                  use_linear_projection=True),
        te=dict(vocab_size=288, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                layer_norm_eps=1e-5, projection_dim=48),
        prediction_type="v_prediction",
        bin=False,   # .safetensors weights only (keeps tests/data/sd small)
    ),
}
VAE_CFG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=VAE_CH, latent_channels=4,
               layers_per_block=2, norm_num_groups=GROUPS, sample_size=32)
SCHED_CFG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


# ---- seeded weights --------------------------------------------------------------------------
def reinit(model, gen):
    """Every floating tensor of the state dict from `gen`: 1-D weights (norms) 1 + 0.2 N,
    biases 0.2 N, embeddings 0.5 N, other weights N / sqrt(fan_in)."""
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=gen, dtype=torch.float32)
            if name.endswith("bias"):
                v = 0.2 * r
            elif t.ndim == 1:
                v = 1.0 + 0.2 * r
            elif "embedding" in name:
                v = 0.5 * r
            else:
                fan_in = t[0].numel() if t.ndim > 1 else 1
                v = r / math.sqrt(fan_in)
            t.copy_(v)


def build(ver):
    cfg = VERSIONS[ver]
    gen = torch.Generator().manual_seed(cfg["seed"])
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**VAE_CFG)
    te = CLIPTextModel(CLIPTextConfig(**cfg["te"]))
    for m in (unet, vae, te):
        reinit(m, gen)
        m.to(DTYPE)
        m.eval()
    # The buffer is an expand()ed view (stride 0); safetensors needs contiguous memory.
    emb = te.text_model.embeddings
    emb.position_ids = emb.position_ids.clone().contiguous()
    return unet, vae, te, gen


# ---- diffusers -> LDM (spec/kohya-lora.md section 3), written independently of the C code ----
RESNET_TO_LDM = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                 ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def unet_resnet_rest(rest):
    for hf, ldm in RESNET_TO_LDM:
        if rest.startswith(hf + "."):
            return ldm + rest[len(hf):]
    raise KeyError(rest)


def unet_key_to_ldm(k, layers_per_block, up_has_attn):
    n = layers_per_block + 1   # LDM blocks per level: the resnets plus the down/upsampler slot
    m = re.fullmatch(r"time_embedding\.linear_([12])\.(.*)", k)
    if m:
        return "time_embed.%d.%s" % (0 if m[1] == "1" else 2, m[2])
    m = re.fullmatch(r"conv_in\.(.*)", k)
    if m:
        return "input_blocks.0.0." + m[1]
    m = re.fullmatch(r"conv_norm_out\.(.*)", k)
    if m:
        return "out.0." + m[1]
    m = re.fullmatch(r"conv_out\.(.*)", k)
    if m:
        return "out.2." + m[1]
    m = re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k)
    if m:
        return "input_blocks.%d.0.%s" % (n * int(m[1]) + int(m[2]) + 1, unet_resnet_rest(m[3]))
    m = re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", k)
    if m:
        return "input_blocks.%d.1.%s" % (n * int(m[1]) + int(m[2]) + 1, m[3])
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k)
    if m:
        return "input_blocks.%d.0.op.%s" % (n * (int(m[1]) + 1), m[2])
    m = re.fullmatch(r"mid_block\.resnets\.([01])\.(.*)", k)
    if m:
        return "middle_block.%d.%s" % (2 * int(m[1]), unet_resnet_rest(m[2]))
    m = re.fullmatch(r"mid_block\.attentions\.0\.(.*)", k)
    if m:
        return "middle_block.1." + m[1]
    m = re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k)
    if m:
        return "output_blocks.%d.0.%s" % (n * int(m[1]) + int(m[2]), unet_resnet_rest(m[3]))
    m = re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", k)
    if m:
        return "output_blocks.%d.1.%s" % (n * int(m[1]) + int(m[2]), m[3])
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k)
    if m:
        i = int(m[1])
        # the upsampler follows the resnet (and the attention, when the block has one)
        return "output_blocks.%d.%d.conv.%s" % (n * i + n - 1, 2 if up_has_attn[i] else 1, m[2])
    raise KeyError(k)


VAE_RESNET = [("conv_shortcut", "nin_shortcut")]
VAE_ATTN = [("group_norm", "norm"), ("query", "q"), ("key", "k"), ("value", "v"), ("proj_attn", "proj_out")]


def vae_resnet_rest(rest):
    for hf, ldm in VAE_RESNET:
        if rest.startswith(hf + "."):
            return ldm + rest[len(hf):]
    return rest   # norm1, conv1, norm2, conv2 keep their names


def vae_key_to_ldm(k, n_levels):
    """Returns (ldm_key, reshape_to_conv1x1)."""
    for same in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.",
                 "quant_conv.", "post_quant_conv."):
        if k.startswith(same):
            return k, False
    m = re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.*)", k)
    if m:
        return "%s.norm_out.%s" % (m[1], m[2]), False
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k)
    if m:
        return "encoder.down.%s.block.%s.%s" % (m[1], m[2], vae_resnet_rest(m[3])), False
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k)
    if m:
        return "encoder.down.%s.downsample.conv.%s" % (m[1], m[2]), False
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k)
    if m:   # decoder levels are numbered in reverse in LDM
        return "decoder.up.%d.block.%s.%s" % (n_levels - 1 - int(m[1]), m[2], vae_resnet_rest(m[3])), False
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k)
    if m:
        return "decoder.up.%d.upsample.conv.%s" % (n_levels - 1 - int(m[1]), m[2]), False
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.*)", k)
    if m:
        return "%s.mid.block_%d.%s" % (m[1], int(m[2]) + 1, vae_resnet_rest(m[3])), False
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.([a-z_]+)\.(weight|bias)", k)
    if m:
        ldm = dict(VAE_ATTN)[m[2]]
        return "%s.mid.attn_1.%s.%s" % (m[1], ldm, m[3]), (ldm != "norm" and m[3] == "weight")
    raise KeyError(k)


OPENCLIP_LAYER = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                  ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")]


def to_ldm(ver, unet_sd, vae_sd, te_sd, unet_cfg, gen):
    """Returns (ldm_state_dict, mapping ldm_key -> [component, diffusers keys...], extra keys)."""
    ldm, mapping, extra = {}, {}, []

    def put(key, tensor, comp, names):
        assert key not in ldm, key
        ldm[key] = tensor.clone().contiguous()
        mapping[key] = [comp] + names

    up_has_attn = ["CrossAttn" in t for t in unet_cfg["up_block_types"]]
    for k, v in unet_sd.items():
        put("model.diffusion_model." + unet_key_to_ldm(k, unet_cfg["layers_per_block"], up_has_attn), v,
            "unet", [k])
    for k, v in vae_sd.items():
        lk, to_conv = vae_key_to_ldm(k, len(VAE_CFG["block_out_channels"]))
        if to_conv:
            assert v.ndim == 2
            v = v.reshape(v.shape[0], v.shape[1], 1, 1)
        put("first_stage_model." + lk, v, "vae", [k])
    if ver == "v1":
        for k, v in te_sd.items():
            put("cond_stage_model.transformer." + k, v, "te", [k])
    else:
        p = "cond_stage_model.model."
        n_layers = VERSIONS[ver]["te"]["num_hidden_layers"]
        done = set()
        for k, v in te_sd.items():
            if k in done:
                continue
            if k == "text_model.embeddings.position_ids":
                continue   # OpenCLIP has no such key; readers synthesise it
            if k == "text_model.embeddings.token_embedding.weight":
                put(p + "token_embedding.weight", v, "te", [k])
                continue
            if k == "text_model.embeddings.position_embedding.weight":
                put(p + "positional_embedding", v, "te", [k])
                continue
            m = re.fullmatch(r"text_model\.final_layer_norm\.(weight|bias)", k)
            if m:
                put(p + "ln_final." + m[1], v, "te", [k])
                continue
            m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)", k)
            if m:
                names = ["text_model.encoder.layers.%s.self_attn.%s_proj.%s" % (m[1], c, m[2]) for c in "qkv"]
                done.update(names)
                put(p + "transformer.resblocks.%s.attn.in_proj_%s" % (m[1], m[2]),
                    torch.cat([te_sd[x] for x in names], 0), "te", names)
                continue
            m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.*)\.(weight|bias)", k)
            if m:
                ldm_name = dict(OPENCLIP_LAYER)[m[2]]
                put(p + "transformer.resblocks.%s.%s.%s" % (m[1], ldm_name, m[3]), v, "te", [k])
                continue
            raise KeyError(k)
        # SD2's OpenCLIP has one more block than the text encoder uses, plus the projection
        # head; none of them has a diffusers name.
        h = VERSIONS[ver]["te"]["hidden_size"]
        f = VERSIONS[ver]["te"]["intermediate_size"]
        last = p + "transformer.resblocks.%d." % n_layers
        shapes = {"ln_1.weight": [h], "ln_1.bias": [h], "attn.in_proj_weight": [3 * h, h],
                  "attn.in_proj_bias": [3 * h], "attn.out_proj.weight": [h, h], "attn.out_proj.bias": [h],
                  "ln_2.weight": [h], "ln_2.bias": [h], "mlp.c_fc.weight": [f, h], "mlp.c_fc.bias": [f],
                  "mlp.c_proj.weight": [h, f], "mlp.c_proj.bias": [h]}
        for name, shape in shapes.items():
            ldm[last + name] = (torch.randn(shape, generator=gen) * 0.3 + 0.1).to(DTYPE)
            extra.append(last + name)
        ldm[p + "text_projection"] = (torch.randn([h, h], generator=gen) * 0.3).to(DTYPE)
        ldm[p + "logit_scale"] = torch.tensor(math.log(100.0), dtype=DTYPE)
        extra += [p + "text_projection", p + "logit_scale"]
    # What a real (pruned or not) LDM checkpoint carries besides the networks.
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ldm["alphas_cumprod"] = torch.cumprod(1.0 - betas, 0).to(torch.float32)
    ldm["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32)
    ldm["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
    ldm["model_ema.diffusion_modelinput_blocks00weight"] = \
        (torch.randn(list(unet_sd["conv_in.weight"].shape), generator=gen) * 0.1).to(DTYPE)
    extra += ["alphas_cumprod", "model_ema.decay", "model_ema.num_updates",
              "model_ema.diffusion_modelinput_blocks00weight"]
    for k in extra:
        mapping[k] = ["extra", k]
    return ldm, mapping, sorted(extra)


# ---- writing ------------------------------------------------------------------------------------
def save_both(model, folder, bin_name, st_name, with_bin):
    """save_pretrained twice (it deletes other weight files with the same stem)."""
    os.makedirs(folder, exist_ok=True)
    for safe, name in ((False, bin_name), (True, st_name)):
        if not safe and not with_bin:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=safe)
            shutil.copyfile(os.path.join(tmp, name), os.path.join(folder, name))
            shutil.copyfile(os.path.join(tmp, "config.json"), os.path.join(folder, "config.json"))


def key_list(sd):
    return [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in sorted(sd.items())]


def check_same(a, b, what):
    assert sorted(a) == sorted(b), (what, set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), (what, k)


def write_json(path, obj):
    """Compact JSON, one list element or dict entry per line (small and diff-friendly)."""
    c = dict(separators=(",", ":"), ensure_ascii=True)
    lines = []
    for i, (k, v) in enumerate(obj.items()):
        end = "," if i + 1 < len(obj) else ""
        if isinstance(v, list) and v:
            body = ",\n".join(json.dumps(x, **c) for x in v)
            lines.append("%s:[\n%s\n]%s" % (json.dumps(k), body, end))
        elif isinstance(v, dict) and v:
            body = ",\n".join("%s:%s" % (json.dumps(a), json.dumps(b, **c)) for a, b in v.items())
            lines.append("%s:{\n%s\n}%s" % (json.dumps(k), body, end))
        else:
            lines.append("%s:%s%s" % (json.dumps(k), json.dumps(v, **c), end))
    with open(path, "w") as f:
        f.write("{\n" + "\n".join(lines) + "\n}\n")
    assert json.load(open(path)) == obj


def write_version(ver):
    cfg = VERSIONS[ver]
    unet, vae, te, gen = build(ver)
    sds = {"unet": unet.state_dict(), "vae": vae.state_dict(), "te": te.state_dict()}
    d = os.path.join(OUT, ver + "_diffusers")
    if os.path.isdir(d):
        shutil.rmtree(d)
    with_bin = cfg["bin"]
    save_both(unet, os.path.join(d, "unet"), "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors",
              with_bin)
    save_both(vae, os.path.join(d, "vae"), "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors",
              with_bin)
    save_both(te, os.path.join(d, "text_encoder"), "pytorch_model.bin", "model.safetensors", with_bin)
    sched = DDIMScheduler(**SCHED_CFG, prediction_type=cfg["prediction_type"])
    sched.save_pretrained(os.path.join(d, "scheduler"))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(d, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")

    # Read back through the libraries: both weight formats give the same tensors.
    for sub, cls, kw in (("unet", UNet2DConditionModel, {}), ("vae", AutoencoderKL, {})):
        st = load_file(os.path.join(d, sub, "diffusion_pytorch_model.safetensors"))
        check_same(st, sds[sub], sub + " safetensors")
        if with_bin:
            bn = torch.load(os.path.join(d, sub, "diffusion_pytorch_model.bin"), map_location="cpu")
            check_same(bn, sds[sub], sub + " bin")
        back = cls.from_pretrained(os.path.join(d, sub), torch_dtype=DTYPE)
        check_same(back.state_dict(), sds[sub], sub + " from_pretrained")
    st = load_file(os.path.join(d, "text_encoder", "model.safetensors"))
    check_same(st, sds["te"], "te safetensors")
    if with_bin:
        bn = torch.load(os.path.join(d, "text_encoder", "pytorch_model.bin"), map_location="cpu")
        check_same(bn, sds["te"], "te bin")
    back = CLIPTextModel.from_pretrained(os.path.join(d, "text_encoder"), torch_dtype=DTYPE)
    check_same(back.state_dict(), sds["te"], "te from_pretrained")

    ldm, mapping, extra = to_ldm(ver, sds["unet"], sds["vae"], sds["te"], dict(unet.config), gen)
    # Every diffusers tensor appears in exactly one LDM key (v2's position_ids excepted).
    covered = [(m[0], n) for m in mapping.values() if m[0] != "extra" for n in m[1:]]
    assert len(covered) == len(set(covered))
    want = {(c, k) for c, sd in sds.items() for k in sd}
    if ver == "v2":
        want.discard(("te", "text_model.embeddings.position_ids"))
    assert set(covered) == want, set(covered) ^ want
    st_path = os.path.join(OUT, ver + "_ldm.safetensors")
    save_file(ldm, st_path)
    check_same(load_file(st_path), ldm, "ldm safetensors")
    ck_path = os.path.join(OUT, ver + "_ldm.ckpt")
    torch.save({"state_dict": ldm, "epoch": 1, "global_step": 10}, ck_path)
    ck = torch.load(ck_path, map_location="cpu")
    check_same(ck["state_dict"], ldm, "ldm ckpt")

    expected = {
        "version": ver,
        "generated_with": {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                           "torch": torch.__version__, "safetensors": safetensors.__version__},
        "unet": key_list(sds["unet"]),
        "vae": key_list(sds["vae"]),
        "te": key_list(sds["te"]),
        "ldm_to_diffusers": dict(sorted(mapping.items())),
        "extra": extra,
        # diffusers keys with no LDM counterpart (made up by a reader)
        "synthesised": [["te", "text_model.embeddings.position_ids"]] if ver == "v2" else [],
        "prediction_type": cfg["prediction_type"],
    }
    write_json(os.path.join(OUT, "expected_keys_%s.json" % ver), expected)
    return [st_path, ck_path]


def main():
    torch.use_deterministic_algorithms(True)
    os.makedirs(OUT, exist_ok=True)
    for ver in VERSIONS:
        for p in write_version(ver):
            print("wrote", os.path.relpath(p, os.path.join(HERE, "..", "..")))


if __name__ == "__main__":
    main()
