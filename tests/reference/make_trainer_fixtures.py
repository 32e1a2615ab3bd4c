#!/usr/bin/env python3
"""Fixtures for the trainer's metadata and hashes (tests/e2e/test_train_hashes.c,
tests/e2e/test_train_loop.c), computed by kohya-ss sd-scripts' own functions.

Run with tests/reference/.venv (torch 1.13, safetensors):
    tests/reference/.venv/bin/python tests/reference/make_trainer_fixtures.py [/tmp/kohya-full]
writes tests/data/trainer/hashes.json:
  models.<file>          train_util.model_hash / calculate_sha256 of tests/data/sd/<file>
                         (ss_sd_model_hash / ss_new_sd_model_hash)
  lora.<case>            train_util.precalculate_safetensors_hashes(state_dict, metadata) of a
                         deterministic LoRA state dict (values ((i*7919 + 13*t) % 2001 - 1000) / 1024
                         for element i of tensor t, exact in every dtype used) with `metadata`
                         (ss_* keys, one non-ASCII value, one user key that the hash must ignore);
                         case "float" keeps float32, "fp16" casts every tensor (alpha too) as
                         save_weights(dtype=float16) does. The data region is > 1 MiB so the legacy
                         hash window holds tensor bytes.
The kohya functions are taken from library/train_util.py by name (ast) and executed as written,
so their imports (cv2, albumentations, ...) are not needed.
"""
import ast
import hashlib
import json
import os
import sys
from io import BytesIO

import safetensors.torch
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data")
KOHYA = sys.argv[1] if len(sys.argv) > 1 else "/tmp/kohya-full"

WANT = ["model_hash", "calculate_sha256", "precalculate_safetensors_hashes", "addnet_hash_legacy",
        "addnet_hash_safetensors"]


def kohya_functions():
    src = open(os.path.join(KOHYA, "library", "train_util.py"), encoding="utf-8").read()
    tree = ast.parse(src)
    mod = ast.Module(body=[n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in WANT],
                     type_ignores=[])
    g = {"hashlib": hashlib, "BytesIO": BytesIO, "safetensors": safetensors}
    exec(compile(mod, "train_util.py", "exec"), g)
    return g


# module name, rank, in, out, alpha  (the C test builds the same list)
MODULES = [("lora_te_text_model_encoder_layers_0_mlp_fc1", 8, 768, 3072, 4.0),
           ("lora_unet_mid_block_attentions_0_proj_in", 128, 2048, 2048, 8.0)]

METADATA = {
    "ss_network_module": "networks.lora", "ss_network_dim": "128", "ss_network_alpha": "8.0",
    "ss_learning_rate": "0.0001", "ss_tag_frequency": json.dumps({"5_red": {"red": 2, "square": 1}}),
    "ss_training_comment": "h\u00e9llo \u2713 \"quoted\" back\\slash",
    "user_note": "not an ss key",
}


def state_dict(dtype):
    sd = {}
    t = 0
    for name, r, i, o, a in MODULES:
        for suffix, shape in ((".lora_down.weight", (r, i)), (".lora_up.weight", (o, r))):
            n = shape[0] * shape[1]
            idx = torch.arange(n, dtype=torch.int64)
            v = ((idx * 7919 + 13 * t) % 2001 - 1000).to(torch.float32) / 1024.0
            sd[name + suffix] = v.reshape(shape).to(dtype)
            t += 1
        sd[name + ".alpha"] = torch.tensor(a).to(dtype)
    return sd


def main():
    k = kohya_functions()
    out = {"models": {}, "lora": {}, "metadata": METADATA,
           "modules": [list(m) for m in MODULES]}
    for f in ("v1_ldm.safetensors",):
        p = os.path.join(DATA, "sd", f)
        out["models"][f] = {"model_hash": k["model_hash"](p), "sha256": k["calculate_sha256"](p)}
    for case, dt in (("float", torch.float32), ("fp16", torch.float16)):
        mh, lh = k["precalculate_safetensors_hashes"](state_dict(dt), dict(METADATA))
        out["lora"][case] = {"sshs_model_hash": mh, "sshs_legacy_hash": lh}
    os.makedirs(os.path.join(DATA, "trainer"), exist_ok=True)
    with open(os.path.join(DATA, "trainer", "hashes.json"), "w") as fh:
        json.dump(out, fh, indent=1, sort_keys=True)
        fh.write("\n")
    print(json.dumps(out["lora"], indent=1))


if __name__ == "__main__":
    main()
