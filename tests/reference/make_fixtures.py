#!/usr/bin/env python3
"""Writes the reference fixtures in tests/data with the Python safetensors package and torch.

Run from anywhere (the paths are relative to this file):

    tests/reference/.venv/bin/python tests/reference/make_fixtures.py
    tests/reference/.venv/bin/python tests/reference/make_fixtures.py \
        --ours build/tests/io/ours_all_dtypes.safetensors

Every value comes from a fixed formula or a fixed seed, so a rerun with the pinned versions
(requirements.txt, torch 1.13 from Debian) rewrites the files bit for bit.

Files written:
  tests/data/py_all_dtypes.safetensors  one tensor of each common dtype, values by formula
  tests/data/py_escapes.safetensors     JSON string escapes in names and metadata
  tests/data/randn_ref.safetensors      torch.randn / torch.rand outputs for fixed seeds
With --ours PATH (a file written by build/tests/io/write_st_fixture):
  tests/reference/python_reads_ours.json  what the Python package read from our file
  tests/data/ours_all_dtypes.safetensors  a copy of our file
The formulas below are repeated, independently, in tests/io/write_st_fixture.c.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "data"))

# ---- the all-dtypes fixture ---------------------------------------------------------------
# name -> (safetensors dtype, shape). Formulas, element index i in C order:
#   "alpha"                   4.0 (a 0-d scalar, as kohya stores the LoRA alpha)
#   F32 "f32_2d"              float32(i / 3.0 - 1.0)      (computed in double, rounded once)
#   F16/BF16                  ((i % 7) * 0.25 - 0.75) * 2**(i % 4)  (exact in both)
#   F64 "f64_4d"              i / 7.0 - 0.5
#   I64 "i64_1d"              (3 i - 5) * 1000000007      (exceeds 32 bits)
#   I32/I16/I8                3 i - 5
#   U8 "u8_1d"                (37 i + 5) % 256
#   BOOL "bool_2d"            i % 3 == 0
#   F32 "empty_0x3"           no elements
ALL_DTYPES = {
    "alpha": ("F32", []),
    "f32_2d": ("F32", [3, 5]),
    "f16_3d": ("F16", [2, 3, 4]),
    "bf16_1d": ("BF16", [11]),
    "f64_4d": ("F64", [2, 1, 3, 2]),
    "i64_1d": ("I64", [5]),
    "i32_2d": ("I32", [2, 3]),
    "i16_1d": ("I16", [7]),
    "i8_2d": ("I8", [4, 4]),
    "u8_1d": ("U8", [9]),
    "bool_2d": ("BOOL", [3, 3]),
    "empty_0x3": ("F32", [0, 3]),
}
ALL_DTYPES_METADATA = {"ss_network_dim": "4"}

TORCH_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def formula_values(name, dtype, n):
    """Python numbers (exact) for the n elements of tensor `name`."""
    i = range(n)
    if name == "alpha":
        return [4.0]
    if dtype == "F32" or dtype == "F64":
        if name == "f32_2d":
            return [float(np.float32(k / 3.0 - 1.0)) for k in i]
        if name == "f64_4d":
            return [k / 7.0 - 0.5 for k in i]
        return []
    if dtype in ("F16", "BF16"):
        return [((k % 7) * 0.25 - 0.75) * (1 << (k % 4)) for k in i]
    if dtype == "I64":
        return [(3 * k - 5) * 1000000007 for k in i]
    if dtype in ("I32", "I16", "I8"):
        return [3 * k - 5 for k in i]
    if dtype == "U8":
        return [(37 * k + 5) % 256 for k in i]
    if dtype == "BOOL":
        return [k % 3 == 0 for k in i]
    raise ValueError(dtype)


def formula_tensor(name):
    dtype, shape = ALL_DTYPES[name]
    n = int(np.prod(shape)) if shape else 1
    vals = formula_values(name, dtype, n)
    if dtype in ("F32", "F16", "BF16", "F64"):
        # float64 holds every value exactly; the cast to the target type is then exact
        # (F32 values were rounded to float32 already).
        t = torch.tensor(vals, dtype=torch.float64).to(TORCH_DTYPES[dtype])
    else:
        t = torch.tensor(vals, dtype=TORCH_DTYPES[dtype])
    t = t.reshape(shape)
    assert list(t.shape) == shape
    return t


def all_dtypes_tensors():
    return {name: formula_tensor(name) for name in ALL_DTYPES}


def write_all_dtypes():
    path = os.path.join(DATA, "py_all_dtypes.safetensors")
    save_file(all_dtypes_tensors(), path, metadata=ALL_DTYPES_METADATA)
    return path


# ---- JSON escapes: control characters, quote, backslash, slash, non-ASCII ----------------
ESCAPES_METADATA = {"ss_tag": "a\x1fb\x0bc\x01\"q\"\\/\u00e9\u20ac\U0001F600\n\t\r\b\f\x7f\u2028"}
ESCAPES_NAMES = ["esc\x0e\"name\\/\u00e9", "plain"]


def write_escapes():
    path = os.path.join(DATA, "py_escapes.safetensors")
    tensors = {
        ESCAPES_NAMES[0]: torch.tensor([1.5, -2.0], dtype=torch.float32),
        ESCAPES_NAMES[1]: torch.tensor([1, 2, 3], dtype=torch.uint8),
    }
    save_file(tensors, path, metadata=ESCAPES_METADATA)
    return path


# ---- torch random streams ---------------------------------------------------------------
RANDN_SEEDS = [0, 42, 12345, 2**32 + 7]
RANDN_SIZES = [1, 3, 15, 16, 17, 100, 1000]


def write_randn():
    out = {}
    for seed in RANDN_SEEDS:
        for n in RANDN_SIZES:
            g = torch.Generator().manual_seed(seed)
            out[f"randn_s{seed}_n{n}"] = torch.randn(n, generator=g, dtype=torch.float32)
    # Consecutive calls on one generator: n=3 leaves the second Box-Muller double of the
    # second pair cached, n=5 starts with it.
    g = torch.Generator().manual_seed(42)
    out["randn_s42_seq_a_n3"] = torch.randn(3, generator=g)
    out["randn_s42_seq_b_n5"] = torch.randn(5, generator=g)
    # The cache survives a vectorised (n >= 16) call, which does not use it.
    g = torch.Generator().manual_seed(7)
    out["randn_s7_seq_a_n3"] = torch.randn(3, generator=g)
    out["randn_s7_seq_b_n17"] = torch.randn(17, generator=g)
    out["randn_s7_seq_c_n1"] = torch.randn(1, generator=g)
    g = torch.Generator().manual_seed(7)
    out["rand_s7_n20"] = torch.rand(20, generator=g)
    # torch keeps only the low 32 bits of the seed for mt19937 (at::mt19937 seeds with
    # seed & 0xffffffff), so seed 2**32 + 7 gives the stream of seed 7.
    a = out[f"randn_s{2**32 + 7}_n17"]
    b = torch.randn(17, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b), "torch no longer masks seeds to 32 bits"
    path = os.path.join(DATA, "randn_ref.safetensors")
    save_file(out, path, metadata={"torch_version": torch.__version__})
    return path


# ---- a kohya-style LoRA file for `lora info` ----------------------------------------------
# Names and shapes as networks/lora.py writes them (spec/kohya-lora.md §1.2-1.3): linear
# modules [r, in] / [out, r], conv 1x1 [r, in, 1, 1], conv 3x3 (conv_dim) [r, in, 3, 3] /
# [out, r, 1, 1]; alpha a 0-d tensor; everything cast to fp16 as --save_precision fp16 does.
LORA_MODULES = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "linear", 320, 320, 4, 1.0),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", "linear", 768, 320, 4, 1.0),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "conv1x1", 320, 320, 4, 1.0),
    ("lora_unet_down_blocks_0_resnets_0_conv1", "conv3x3", 320, 320, 8, 4.0),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "linear", 768, 768, 4, 1.0),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", "linear", 768, 3072, 4, 1.0),
]
LORA_METADATA = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "1.0"}


def write_kohya_lora():
    g = torch.Generator().manual_seed(3)
    out = {}
    for name, kind, fin, fout, r, alpha in LORA_MODULES:
        if kind == "linear":
            down, up = (r, fin), (fout, r)
        elif kind == "conv1x1":
            down, up = (r, fin, 1, 1), (fout, r, 1, 1)
        else:
            down, up = (r, fin, 3, 3), (fout, r, 1, 1)
        out[name + ".lora_down.weight"] = (torch.randn(down, generator=g) * 0.05).to(torch.float16)
        out[name + ".lora_up.weight"] = (torch.randn(up, generator=g) * 0.01).to(torch.float16)
        out[name + ".alpha"] = torch.tensor(alpha).to(torch.float16)
    path = os.path.join(DATA, "py_lora_kohya.safetensors")
    save_file(out, path, metadata=LORA_METADATA)
    return path


# ---- reading the file liblora wrote ------------------------------------------------------
def check_ours(ours_path):
    tensors = load_file(ours_path)
    with safe_open(ours_path, framework="pt") as f:
        metadata = f.metadata()
    errors = []
    if metadata != ALL_DTYPES_METADATA:
        errors.append(f"metadata {metadata!r} != {ALL_DTYPES_METADATA!r}")
    if sorted(tensors) != sorted(ALL_DTYPES):
        errors.append(f"tensor names {sorted(tensors)} != {sorted(ALL_DTYPES)}")
    want_dtype_name = {v: k for k, v in TORCH_DTYPES.items()}
    report = {}
    for name in sorted(tensors):
        t = tensors[name]
        if name in ALL_DTYPES:
            want = formula_tensor(name)
            if t.dtype != want.dtype or list(t.shape) != list(want.shape) or not torch.equal(t, want):
                errors.append(f"tensor {name}: {t.dtype} {list(t.shape)} differs from the formula")
        report[name] = {
            "dtype": want_dtype_name[t.dtype],
            "shape": list(t.shape),
            "sum": float(t.to(torch.float64).sum().item()),
        }
    with open(ours_path, "rb") as f:
        ours_bytes = f.read()
    with open(os.path.join(DATA, "py_all_dtypes.safetensors"), "rb") as f:
        py_bytes = f.read()
    result = {
        "safetensors_version": safetensors.__version__,
        "torch_version": torch.__version__,
        "bytes_identical_to_py_all_dtypes": ours_bytes == py_bytes,
        "tensors": report,
        "metadata": metadata,
    }
    if errors:
        for e in errors:
            print("ERROR:", e, file=sys.stderr)
        sys.exit(1)
    with open(os.path.join(HERE, "python_reads_ours.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    dst = os.path.join(DATA, "ours_all_dtypes.safetensors")
    if os.path.abspath(ours_path) != os.path.abspath(dst):
        shutil.copyfile(ours_path, dst)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", help="a file written by build/tests/io/write_st_fixture to check and copy")
    args = ap.parse_args()
    os.makedirs(DATA, exist_ok=True)
    for p in (write_all_dtypes(), write_escapes(), write_randn(), write_kohya_lora()):
        print("wrote", os.path.relpath(p))
    if args.ours:
        r = check_ours(args.ours)
        print("python read", args.ours, "OK; byte-identical to py_all_dtypes:", r["bytes_identical_to_py_all_dtypes"])


if __name__ == "__main__":
    main()
