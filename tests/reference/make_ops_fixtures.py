#!/usr/bin/env python3
"""Fixtures for tests/io/test_ops.c (merge, svd merge, extract, resize), made by running
kohya-ss/sd-scripts' own networks/merge_lora.py, svd_merge_lora.py,
extract_lora_from_models.py and resize_lora.py (commit 75d1883da630c033841ff7fc79a94ca7131dd3d3,
checked out OUTSIDE this repository, as for make_network_fixtures.py) on the tiny models of
tests/data/sd and the kohya-written LoRAs of tests/data/network.

  tests/reference/.venv/bin/python tests/reference/make_ops_fixtures.py --kohya /tmp/kohya

kohya's model_util.load_models_from_stable_diffusion_checkpoint hard-codes SD-size configs,
so the tiny models are loaded from their diffusers folders (same weights as vN_ldm.*) and the
scripts' functions are called on them (extract: model_util's loader is replaced by one that
returns those models). Writes into tests/data/ops/:

  vN_merge{1,2}.safetensors  merge_lora.merge_to_sd_model in float: every TE/U-Net weight the
                             merge changed ("te."/"unet." + diffusers name, float32)
                             (every 6th by name): v1_merge2: v1_kohya x 0.7, v1_conv x -0.3;
                             v2_merge2: v2_kohya x 0.7, v2_kohya x -0.3
  v1_b.safetensors           a second dim-2 LoRA (alpha 1, fp16, a subset of the modules, seeded)
  lmerge.safetensors         merge_lora.merge_lora_models([v1_b, v1_kohya], [0.7, -0.3], float)
                             (the modules of v1_b and the first 4 others)
  svdmerge.safetensors       svd_merge_lora.merge_lora_models([v1_kohya, v1_conv], [0.7, -0.3],
                             new_rank 2, new_conv_rank 1, float) (every 8th module and every 3x3 one)
  v1_tuned.safetensors       tuned fp16 weights of the perturbed modules (seed 7)
  extract.safetensors        extract_lora_from_models.svd, dim 2, conv_dim 1, v1 org vs tuned
                             (the perturbed modules; the others come out zero)
  resize_r1.safetensors      resize_lora.resize_lora_model(v1_kohya, new_rank 1) (modules 0..39)
  resize_svratio.safetensors the same with new_rank 2, dynamic_method sv_ratio, param 2
"""
import argparse, os, sys, types, hashlib

import torch
from safetensors.torch import save_file, load_file, save as st_save

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "tests", "data", "ops")
NET = os.path.join(ROOT, "tests", "data", "network")


def precalculate_hashes(state_dict, metadata):
    meta = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = st_save(state_dict, meta)
    n = int.from_bytes(b[:8], "little")
    return hashlib.sha256(b[8 + n:]).hexdigest(), hashlib.sha256(b[0x100000:0x110000]).hexdigest()[:8]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kohya", required=True)
    a = ap.parse_args()
    lib = types.ModuleType("library")
    lib.__path__ = [os.path.join(a.kohya, "library")]
    tu = types.ModuleType("library.train_util")
    tu.precalculate_safetensors_hashes = precalculate_hashes
    mu = types.ModuleType("library.model_util")
    mu.is_safetensors = lambda p: os.path.splitext(p)[1].lower() == ".safetensors"
    lib.train_util = tu
    lib.model_util = mu
    sys.modules["library"] = lib
    sys.modules["library.train_util"] = tu
    sys.modules["library.model_util"] = mu
    sys.path.insert(0, os.path.join(a.kohya, "networks"))
    sys.path.insert(0, a.kohya)
    import lora, merge_lora, svd_merge_lora, resize_lora, extract_lora_from_models as extract
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    base_unet = list(lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE)
    conv_unet = base_unet + list(lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE_CONV2D_3X3)
    os.makedirs(OUT, exist_ok=True)

    def load(v, dtype=torch.float):
        d = os.path.join(ROOT, "tests", "data", "sd", f"v{v}_diffusers")
        unet = UNet2DConditionModel.from_pretrained(d, subfolder="unet").to(dtype)
        te = CLIPTextModel.from_pretrained(d, subfolder="text_encoder").to(dtype)
        return te, unet

    def save(name, sd, meta=None):
        p = os.path.join(OUT, name)
        save_file({k: t.contiguous() for k, t in sd.items()}, p, meta)
        print(f"{name}: {len(sd)} tensors, {os.path.getsize(p)} bytes")

    # 1. merge into a model
    cases = {"v1_merge2": (1, ["v1_kohya", "v1_conv"], [0.7, -0.3]),
             "v2_merge2": (2, ["v2_kohya", "v2_kohya"], [0.7, -0.3])}
    for name, (v, files, ratios) in cases.items():
        te0, unet0 = load(v)
        te, unet = load(v)
        lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(conv_unet)
        merge_lora.merge_to_sd_model(te, unet, [os.path.join(NET, f + ".safetensors") for f in files], ratios,
                                     torch.float)
        lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(base_unet)
        out = {}
        for pre, m0, m1 in (("te.", te0, te), ("unet.", unet0, unet)):
            s0, s1 = m0.state_dict(), m1.state_dict()
            for k in s1:
                if not torch.equal(s0[k], s1[k]):
                    out[pre + k] = s1[k].detach().float()
        # size: every 6th changed tensor (sorted names), each compared in full
        save(name + ".safetensors", {k: out[k] for k in sorted(out)[::6]})

    # 2. LoRA + LoRA, kohya's rule
    kohya1 = load_file(os.path.join(NET, "v1_kohya.safetensors"))
    mods = sorted({k.split(".")[0] for k in kohya1})
    te_mods = [m for m in mods if m.startswith("lora_te")]
    un_mods = [m for m in mods if m.startswith("lora_unet")]
    sub = te_mods[:6] + un_mods[::10]
    g = torch.Generator().manual_seed(500)
    b = {}
    for m in sub:
        for part in ("lora_down.weight", "lora_up.weight"):
            k = m + "." + part
            b[k] = (torch.randn(kohya1[k].shape, generator=g) * 0.2).half()
        b[m + ".alpha"] = torch.tensor(1.0).half()
    save("v1_b.safetensors", b)
    merged = merge_lora.merge_lora_models([os.path.join(OUT, "v1_b.safetensors"),
                                           os.path.join(NET, "v1_kohya.safetensors")], [0.7, -0.3], torch.float)
    keep = set(sub) | set([m for m in mods if m not in sub][:4])
    save("lmerge.safetensors", {k: t.float() for k, t in merged.items() if k.split(".")[0] in keep})

    # 3. svd merge
    sm = svd_merge_lora.merge_lora_models([os.path.join(NET, "v1_kohya.safetensors"),
                                           os.path.join(NET, "v1_conv.safetensors")], [0.7, -0.3], 2, 1, None,
                                          torch.float)
    smods = sorted({k.split(".")[0] for k in sm})
    skeep = set(smods[::8]) | {m.split(".")[0] for m in sm if sm[m].dim() == 4 and sm[m].shape[-1] == 3}
    save("svdmerge.safetensors", {k: t for k, t in sm.items() if k.split(".")[0] in skeep})

    # 4. extract from a perturbed v1
    te_o, unet_o = load(1)
    te_t, unet_t = load(1)
    lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(conv_unet)
    probe = lora.create_network(1.0, 2, 2, None, te_o, unet_o, conv_dim=1, conv_alpha=1)
    lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(base_unet)
    names = {}
    for pre, root in (("te.", te_o), ("unet.", unet_o)):
        for n, mod in root.named_modules():
            names[id(mod)] = pre + n + ".weight"
    all_l = probe.text_encoder_loras + probe.unet_loras
    pert = probe.text_encoder_loras[:3] + probe.unet_loras[::7]
    g = torch.Generator().manual_seed(7)
    sd_t = {"te.": te_t.state_dict(), "unet.": unet_t.state_dict()}
    tuned = {}
    with torch.no_grad():
        for l in pert:
            key = names[id(l.org_module)]
            pre, k = key.split(".", 1)
            w = sd_t[pre + "."][k]
            w16 = (w + torch.randn(w.shape, generator=g) * 0.02).half()
            w.copy_(w16.float())
            tuned[key] = w16
    save("v1_tuned.safetensors", tuned)
    mu.load_models_from_stable_diffusion_checkpoint = lambda v2, p: (te_o, None, unet_o) if p == "org" else (te_t, None, unet_t)
    tmp = "/tmp/ops_extract.safetensors"
    ns = argparse.Namespace(v2=False, save_precision=None, model_org="org", model_tuned="tuned", save_to=tmp, dim=2,
                            conv_dim=1, device=None)
    lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(base_unet)
    extract.svd(ns)
    lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(base_unet)
    ex = load_file(tmp)
    pn = {l.lora_name for l in pert}
    save("extract.safetensors", {k: t for k, t in ex.items() if k.split(".")[0] in pn})

    # 5. resize
    sd, _ = resize_lora.load_state_dict(os.path.join(NET, "v1_kohya.safetensors"), torch.float)
    first = set(sorted({k.split(".")[0] for k in sd})[:40])
    o, _, _ = resize_lora.resize_lora_model(dict(sd), 1, torch.float, "cpu", None, None, False)
    save("resize_r1.safetensors", {k: t for k, t in o.items() if k.split(".")[0] in first})
    o, _, _ = resize_lora.resize_lora_model(dict(sd), 2, torch.float, "cpu", "sv_ratio", 2.0, False)
    save("resize_svratio.safetensors", {k: t for k, t in o.items() if k.split(".")[0] in first})


if __name__ == "__main__":
    main()
