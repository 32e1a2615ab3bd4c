#!/usr/bin/env python3
"""Checks that the reference libraries load the models liblora writes.

    ninja -C build
    tests/reference/.venv/bin/python tests/reference/check_our_models.py --lora build/tools/lora

For v1 and v2 it runs `lora convert` from the LDM .safetensors fixture into .safetensors and
.ckpt, and from the diffusers fixture folder into a diffusers folder with .bin weights and one
with .safetensors weights (the tiny models' head counts and GroupNorm groups are not stored in
LDM files, so an LDM -> diffusers conversion of them is refused by design), and then:
  * torch.load reads our .ckpt (weights_only=True: it holds only tensors and dicts) and its
    state_dict equals the LDM fixture tensor for tensor, bit for bit;
  * the safetensors package reads our .safetensors and it equals the fixture;
  * diffusers 0.10.2 UNet2DConditionModel / AutoencoderKL.from_pretrained and transformers
    4.25.1 CLIPTextModel.from_pretrained load both of our folders, and their state dicts equal
    the diffusers fixture folder's (written by save_pretrained) bit for bit; the configs we
    wrote give the same model classes and block structure.
The result goes to tests/reference/python_reads_our_models.json with a 64-bit FNV-1a hash of
every file liblora wrote, so tests/io/test_model.c can check that today's writer still
produces exactly the files Python accepted.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import diffusers
import transformers
import safetensors
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel

HERE = os.path.dirname(os.path.abspath(__file__))
SD = os.path.normpath(os.path.join(HERE, "..", "data", "sd"))
OUT_JSON = os.path.join(HERE, "python_reads_our_models.json")


def fnv1a64(path):
    h = 0xcbf29ce484222325
    with open(path, "rb") as f:
        for b in f.read():
            h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def same_state(a, b, what):
    assert set(a) == set(b), "%s: keys differ: only ours %s, only reference %s" % (
        what, sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5])
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, "%s: %s: %s%s vs %s%s" % (what, k, x.dtype, tuple(x.shape), y.dtype, tuple(y.shape))
        assert torch.equal(x, y), "%s: %s: values differ" % (what, k)
    return len(a)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lora", required=True, help="the built `lora` command")
    args = ap.parse_args()
    result = {"torch_version": torch.__version__, "diffusers_version": diffusers.__version__,
              "transformers_version": transformers.__version__, "safetensors_version": safetensors.__version__,
              "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for v in ("v1", "v2"):
            src = os.path.join(SD, v + "_ldm.safetensors")
            ldm = load_file(src)
            flags = ["--v_parameterization"] if v == "v2" else []
            ref = os.path.join(SD, v + "_diffusers")
            outs = {
                "safetensors": os.path.join(tmp, v + ".safetensors"),
                "ckpt": os.path.join(tmp, v + ".ckpt"),
                "diffusers": os.path.join(tmp, v + "_diffusers_bin"),
                "diffusers_safetensors": os.path.join(tmp, v + "_diffusers_st"),
            }
            for fmt, out in outs.items():
                source = ref if fmt.startswith("diffusers") else src
                subprocess.run([args.lora, "convert", source, out, "--save_model_as", fmt] + flags, check=True,
                               stderr=subprocess.DEVNULL)
            r = {"files": {}, "checked": {}}
            # single files
            r["checked"]["safetensors"] = same_state(load_file(outs["safetensors"]), ldm, v + " safetensors")
            ck = torch.load(outs["ckpt"], map_location="cpu", weights_only=True)
            assert set(ck) >= {"state_dict"}, "ckpt top level: %s" % sorted(ck)
            r["checked"]["ckpt"] = same_state(ck["state_dict"], ldm, v + " ckpt")
            r["ckpt_top_level_keys"] = sorted(ck)
            # diffusers folders against the save_pretrained fixture
            ref_unet = UNet2DConditionModel.from_pretrained(os.path.join(ref, "unet")).state_dict()
            ref_vae = AutoencoderKL.from_pretrained(os.path.join(ref, "vae")).state_dict()
            ref_te = CLIPTextModel.from_pretrained(os.path.join(ref, "text_encoder")).state_dict()
            for fmt in ("diffusers", "diffusers_safetensors"):
                d = outs[fmt]
                unet = UNet2DConditionModel.from_pretrained(os.path.join(d, "unet"))
                vae = AutoencoderKL.from_pretrained(os.path.join(d, "vae"))
                te = CLIPTextModel.from_pretrained(os.path.join(d, "text_encoder"))
                n = same_state(unet.state_dict(), ref_unet, v + " " + fmt + " unet")
                n += same_state(vae.state_dict(), ref_vae, v + " " + fmt + " vae")
                n += same_state(te.state_dict(), ref_te, v + " " + fmt + " text_encoder")
                r["checked"][fmt] = n
                with open(os.path.join(d, "scheduler", "scheduler_config.json")) as f:
                    r.setdefault("prediction_type", json.load(f)["prediction_type"])
            for fmt, out in outs.items():
                if os.path.isdir(out):
                    for root, _, files in os.walk(out):
                        for name in files:
                            p = os.path.join(root, name)
                            r["files"][fmt + "/" + os.path.relpath(p, out)] = fnv1a64(p)
                else:
                    r["files"][fmt] = fnv1a64(out)
            result["models"][v] = r
            print(v, "OK:", r["checked"])
    with open(OUT_JSON, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote", os.path.relpath(OUT_JSON))


if __name__ == "__main__":
    sys.exit(main())
