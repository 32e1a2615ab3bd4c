#!/usr/bin/env python3
"""Fixtures for tests/io/test_network.c, made by running kohya-ss/sd-scripts' own
networks/lora.py and networks/merge_lora.py (commit given by --kohya, checked out OUTSIDE this
repository) on the tiny diffusers models of tests/data/sd.

  git -C <sd-scripts clone> archive 75d1883da630c033841ff7fc79a94ca7131dd3d3 networks library | tar -x -C /tmp/kohya
  tests/reference/.venv/bin/python tests/reference/make_network_fixtures.py --kohya /tmp/kohya

library/train_util.py imports packages the reference venv lacks (accelerate, torchvision,
albumentations, cv2); lora.py only needs its precalculate_safetensors_hashes, so a stub module
providing our own implementation of that function (spec 9.2) is installed in sys.modules.

Writes into tests/data/network/:
  vN_init.safetensors    from the network as created (torch.manual_seed(1234), dim 2, alpha 2):
                         kohya's down init (kaiming_uniform a=sqrt 5) of the first two TE modules
                         and the last U-Net module (the whole generator stream lies before it)
  vN_kohya.safetensors   the same network with seeded random weights, save_weights(float)
  v1_te_fp16.pt          v1 state dict cast to float16 as save_weights does, text-encoder
                         modules only (size), written with torch.save as save_weights does
  v1_conv.safetensors    v1, dim 1, alpha 2, network_args conv_dim=1, conv_alpha=1 (3x3 LoCon)
  vN_merged.safetensors  base weights after merge_lora.merge_to_sd_model (ratio 1.0, float) for
                         a few modules, keyed by diffusers name with "unet."/"te." prefix
"""
import argparse, hashlib, os, sys, types

import torch
from safetensors.torch import save_file, save as st_save

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "tests", "data", "network")


def precalculate_hashes(state_dict, metadata):
    # spec 9.2: sshs_model_hash = sha256 of the data region; legacy = 8 hex of the 64 KiB at 1 MiB
    # of a serialization with only the ss_* metadata.
    meta = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = st_save(state_dict, meta)
    n = int.from_bytes(b[:8], "little")
    model_hash = hashlib.sha256(b[8 + n:]).hexdigest()
    legacy = hashlib.sha256(b[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kohya", required=True)
    a = ap.parse_args()
    lib = types.ModuleType("library")
    lib.__path__ = [os.path.join(a.kohya, "library")]
    tu = types.ModuleType("library.train_util")
    tu.precalculate_safetensors_hashes = precalculate_hashes
    sys.modules["library"] = lib
    sys.modules["library.train_util"] = tu
    sys.path.insert(0, os.path.join(a.kohya, "networks"))
    sys.path.insert(0, a.kohya)
    import lora
    import merge_lora
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    base_unet = list(lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE)
    os.makedirs(OUT, exist_ok=True)

    def load(v):
        d = os.path.join(ROOT, "tests", "data", "sd", f"v{v}_diffusers")
        unet = UNet2DConditionModel.from_pretrained(d, subfolder="unet").float()
        te = CLIPTextModel.from_pretrained(d, subfolder="text_encoder").float()
        return te, unet

    def make(v, te, unet, dim=2, **kw):
        # create_network extends the class-level U-Net target list in place when conv_dim is
        # given (a kohya quirk): restore it for every network.
        lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(base_unet)
        torch.manual_seed(1234)
        net = lora.create_network(1.0, dim, 2.0, None, te, unet, **kw)
        net.apply_to(te, unet, True, True)
        return net

    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "2", "ss_network_alpha": "2.0",
            "ss_output_name": "fixture"}
    for v in (1, 2):
        te, unet = load(v)
        net = make(v, te, unet)
        sd0 = net.state_dict()
        pick = [net.text_encoder_loras[0].lora_name, net.text_encoder_loras[1].lora_name,
                net.unet_loras[-1].lora_name]
        save_file({k: t.contiguous() for k, t in sd0.items() if k.split(".")[0] in pick},
                  os.path.join(OUT, f"v{v}_init.safetensors"))
        g = torch.Generator().manual_seed(100 + v)
        with torch.no_grad():
            for k, p in sorted(net.state_dict().items()):
                if k.endswith(".weight"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        path = os.path.join(OUT, f"v{v}_kohya.safetensors")
        net.save_weights(path, torch.float, dict(meta))
        print(f"v{v}: {len(net.text_encoder_loras)} TE + {len(net.unet_loras)} U-Net modules -> {path}")
        if v == 1:
            sd = {k: t.detach().clone().to("cpu").to(torch.float16)
                  for k, t in net.state_dict().items() if k.startswith("lora_te")}
            torch.save(sd, os.path.join(OUT, "v1_te_fp16.pt"))
        # merge (fresh models: apply_to replaced forwards but not weights)
        te2, unet2 = load(v)
        lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(base_unet)
        merge_lora.merge_to_sd_model(te2, unet2, [path], [1.0], torch.float)
        pick = {}
        for n in ("down_blocks.0.attentions.0.proj_in.weight",
                  "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                  "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj.weight",
                  "mid_block.attentions.0.proj_out.weight"):
            pick["unet." + n] = unet2.state_dict()[n].contiguous()
        for n in ("text_model.encoder.layers.0.self_attn.q_proj.weight",):
            pick["te." + n] = te2.state_dict()[n].contiguous()
        save_file(pick, os.path.join(OUT, f"v{v}_merged.safetensors"))

    # conv 3x3 LoCon on v1, merged into one resnet conv
    te, unet = load(1)
    net = make(1, te, unet, dim=1, conv_dim="1", conv_alpha="1")
    g = torch.Generator().manual_seed(300)
    with torch.no_grad():
        for k, p in sorted(net.state_dict().items()):
            if k.endswith(".weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = os.path.join(OUT, "v1_conv.safetensors")
    cmeta = dict(meta, ss_network_dim="1", ss_network_args='{"conv_dim": "1", "conv_alpha": "1"}')
    net.save_weights(path, torch.float, cmeta)
    print(f"v1 conv: {len(net.text_encoder_loras)} TE + {len(net.unet_loras)} U-Net modules")
    te2, unet2 = load(1)
    lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = base_unet + list(lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE_CONV2D_3X3)
    merge_lora.merge_to_sd_model(te2, unet2, [path], [1.0], torch.float)
    pick = {}
    for n in ("down_blocks.1.resnets.0.conv1.weight", "down_blocks.0.downsamplers.0.conv.weight",
              "up_blocks.1.resnets.0.conv_shortcut.weight", "up_blocks.1.resnets.0.time_emb_proj.weight",
              "down_blocks.0.attentions.0.proj_in.weight"):
        pick["unet." + n] = unet2.state_dict()[n].contiguous()
    save_file(pick, os.path.join(OUT, "v1_conv_merged.safetensors"))


if __name__ == "__main__":
    main()
