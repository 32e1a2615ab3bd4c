#!/usr/bin/env python3
"""Writes the PyTorch checkpoint fixtures in tests/data/ckpt with real torch.save (torch 1.13),
and the expected tensors of each as a .safetensors file written by the safetensors package.

Run from anywhere (paths are relative to this file); the venv has safetensors and sees
Debian's torch 1.13 (--system-site-packages):

    tests/reference/.venv/bin/python tests/reference/make_ckpt_fixtures.py
    build/tests/io/test_ckpt --write-ours build/tests/io
    tests/reference/.venv/bin/python tests/reference/make_ckpt_fixtures.py \
        --ours build/tests/io/ours_sd.ckpt --ours build/tests/io/ours_lora.pt

Every value comes from a formula or a fixed seed, so a rerun with the same versions rewrites
the files bit for bit.

Files written (tests/data/ckpt/):
  all_dtypes.pt          OrderedDict, one tensor per dtype (the formulas of make_fixtures.py);
                         expected: tests/data/py_all_dtypes.safetensors
  views.pt (+ views_expected.safetensors)
                         non-contiguous views and shared storages: a transposed weight, slices
                         with storage offsets, a stepped slice, an expanded (stride 0) tensor, a
                         permuted bf16 tensor, a 0-d view, an empty view, two fp16 views of one
                         storage
  sd_lightning.ckpt (+ sd_lightning_expected.safetensors)
                         SD-v1/Lightning layout: {'epoch', 'global_step',
                         'pytorch-lightning_version', 'state_dict', 'callbacks':
                         {ModelCheckpoint class: {...}}, 'optimizer_states' (with tensors),
                         'lr_schedulers', numpy scalars, bytes (_codecs.encode), a set, a float,
                         a >64-bit int, torch.device, torch.float16, torch.Size, a
                         ModelCheckpoint instance (NEWOBJ + BUILD)}; tied weights share a storage
  kohya_lora.pt (+ kohya_lora_expected.safetensors)
                         a kohya-style LoRA network's state_dict() cast to fp16 (top-level
                         OrderedDict with the _metadata BUILD that Module.state_dict() adds)
  diffusers.bin (+ diffusers_expected.safetensors)
                         a plain top-level dict, one value an nn.Parameter (_rebuild_parameter)
  proto4.pt (+ proto4_expected.safetensors)
                         torch.save(..., pickle_protocol=4): FRAME, MEMOIZE, SHORT_BINUNICODE,
                         STACK_GLOBAL
  storages.pt (+ storages_expected.safetensors)
                         bare storages as values (an UntypedStorage, a FloatStorage) beside a tensor
  legacy.pt              _use_new_zipfile_serialization=False (must be refused as legacy)
With --ours PATH (twice: the files test_ckpt --write-ours writes with ckpt_write):
  tests/reference/torch_reads_our_ckpt.json   what torch.load read from them (weights_only False
                                              and True), the zip facts (stored, 64-byte aligned,
                                              testzip), and an A1111-style restricted check
  tests/data/ckpt/ours_sd.ckpt, ours_lora.pt  copies of those files
"""
import argparse
import collections
import io
import json
import os
import pickle
import pickletools
import re
import shutil
import sys
import types
import zipfile

import numpy as np
import safetensors
import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "data", "ckpt"))
sys.path.insert(0, HERE)
import make_fixtures  # noqa: E402  (the all-dtypes formulas)


def save_expected(tensors, name):
    """The expected tensors, contiguous and unshared, through the safetensors package."""
    out = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    save_file(out, os.path.join(DATA, name))


# ---- all dtypes -----------------------------------------------------------------------------
def write_all_dtypes():
    sd = collections.OrderedDict((k, make_fixtures.formula_tensor(k)) for k in make_fixtures.ALL_DTYPES)
    torch.save(sd, os.path.join(DATA, "all_dtypes.pt"))


# ---- views and shared storages --------------------------------------------------------------
def views_dict():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) * 0.5 - 3.0
    flat = torch.arange(10, dtype=torch.float16) * 0.25 - 1.0
    bf = (torch.arange(24, dtype=torch.float32) - 7.0).to(torch.bfloat16).reshape(2, 3, 4)
    ints = torch.arange(12, dtype=torch.int64).reshape(3, 4) * 1000000007
    d = collections.OrderedDict()
    d["base"] = base
    d["transposed"] = base.t()                 # strides (1, 6)
    d["slice"] = base[1:3, 2:5]                # offset 8, strides (6, 1)
    d["column"] = base[:, 1]                   # offset 1, stride 6
    d["stepped"] = base[::2, ::3]              # strides (12, 3)
    d["scalar_view"] = base[2, 3]              # 0-d, offset 15
    d["empty_view"] = base[4:, :]              # [0, 6] at offset 24 == storage size
    d["expanded"] = torch.tensor([1.5, -2.0, 3.25]).expand(4, 3)   # stride (0, 1)
    d["shared_a"] = flat[2:6]                  # two fp16 views of one storage
    d["shared_b"] = flat[5:].reshape(5, 1)
    d["bf16_permuted"] = bf.permute(2, 0, 1)   # strides (1, 12, 4)
    d["i64_cols"] = ints[:, 1:3]
    assert not d["transposed"].is_contiguous() and d["slice"].storage_offset() == 8
    assert d["expanded"].stride() == (0, 1)
    return d


def write_views():
    d = views_dict()
    torch.save(d, os.path.join(DATA, "views.pt"))
    save_expected(d, "views_expected.safetensors")


# ---- an SD-v1 / Lightning checkpoint ----------------------------------------------------------
def fake_lightning():
    """A stand-in pytorch_lightning ModelCheckpoint with the real module path and qualname, so
    the pickle names pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for n in names:
        sys.modules.setdefault(n, types.ModuleType(n))
    mod = sys.modules[names[-1]]
    if not hasattr(mod, "ModelCheckpoint"):
        cls = type("ModelCheckpoint", (), {})
        cls.__module__ = names[-1]
        cls.__qualname__ = "ModelCheckpoint"
        mod.ModelCheckpoint = cls
    return mod.ModelCheckpoint


def sd_state_dict():
    g = torch.Generator().manual_seed(11)
    sd = {}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3, generator=g)
    sd["model.diffusion_model.input_blocks.0.0.bias"] = torch.randn(8, generator=g)
    sd["model.diffusion_model.out.2.weight"] = torch.randn(4, 8, 3, 3, generator=g).to(torch.float16)
    sd["first_stage_model.encoder.conv_in.weight"] = torch.randn(4, 3, 3, 3, generator=g)
    emb = torch.randn(10, 8, generator=g)
    sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = emb
    sd["cond_stage_model.tied_lm_head.weight"] = emb          # the same tensor: one storage
    sd["alphas_cumprod"] = torch.linspace(0.99, 0.01, 20, dtype=torch.float32)
    sd["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32)
    sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return sd


def sd_checkpoint():
    MC = fake_lightning()
    inst = MC()
    inst.monitor = None
    inst.best_model_path = "/logs/checkpoints/last.ckpt"
    g = torch.Generator().manual_seed(12)
    return {
        "epoch": 6,
        "global_step": 123456,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": sd_state_dict(),
        "callbacks": {MC: {"monitor": None, "best_model_score": None,
                           "best_model_path": "/logs/checkpoints/last.ckpt", "current_score": None,
                           "dirpath": "/logs/checkpoints"}},
        "optimizer_states": [{"state": {0: {"step": 10, "exp_avg": torch.randn(3, generator=g)}},
                              "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}],
        "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 6}],
        "np_scalar": np.float64(0.125),
        "np_int": np.int64(7),
        "raw_bytes": b"\x00\xff\x10",
        "a_set": {1, 2, 3},
        "a_float": 2.5,
        "big_int": 2 ** 70,
        "device": torch.device("cpu"),
        "dtype": torch.float16,
        "size": torch.Size([2, 3]),
        "callback_instance": inst,
    }


def write_sd_lightning():
    ck = sd_checkpoint()
    path = os.path.join(DATA, "sd_lightning.ckpt")
    torch.save(ck, path)
    save_expected(ck["state_dict"], "sd_lightning_expected.safetensors")
    # the pickle really carries what the C test relies on
    with zipfile.ZipFile(path) as z:
        pkl = z.read("sd_lightning/data.pkl")
    ops = {op.name for op, _, _ in pickletools.genops(pkl)}
    globs = {arg for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL"}
    for want in ("pytorch_lightning.callbacks.model_checkpoint ModelCheckpoint", "numpy.core.multiarray scalar",
                 "numpy dtype", "_codecs encode", "__builtin__ set", "torch device", "torch float16", "torch Size"):
        assert want in globs, (want, globs)
    assert {"NEWOBJ", "BUILD", "BINFLOAT", "LONG1"} <= ops, ops
    loaded = torch.load(path, weights_only=False)
    for k, v in ck["state_dict"].items():
        assert torch.equal(loaded["state_dict"][k], v)
    # torch's own weights_only loader refuses this file (numpy, Lightning): liblora's inert
    # globals are the A1111-style extension on top of it.
    try:
        torch.load(path, weights_only=True)
        raise AssertionError("weights_only=True loaded the Lightning checkpoint")
    except Exception as e:  # noqa: BLE001  (torch raises UnpicklingError/RuntimeError)
        assert "weights_only" in str(e) or "Unsupported" in str(e) or "unsupported" in str(e), e


# ---- kohya LoRA .pt --------------------------------------------------------------------------
KOHYA_MODULES = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "linear", 32, 32, 4, 1.0),
    ("lora_unet_down_blocks_0_resnets_0_conv1", "conv3x3", 8, 8, 2, 2.0),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "linear", 16, 16, 2, 1.0),
]


class LoRAModule(torch.nn.Module):
    def __init__(self, kind, fin, fout, r, alpha, g):
        super().__init__()
        if kind == "linear":
            self.lora_down = torch.nn.Linear(fin, r, bias=False)
            self.lora_up = torch.nn.Linear(r, fout, bias=False)
        else:
            self.lora_down = torch.nn.Conv2d(fin, r, 3, padding=1, bias=False)
            self.lora_up = torch.nn.Conv2d(r, fout, 1, bias=False)
        with torch.no_grad():
            self.lora_down.weight.copy_(torch.randn(self.lora_down.weight.shape, generator=g) * 0.05)
            self.lora_up.weight.copy_(torch.randn(self.lora_up.weight.shape, generator=g) * 0.01)
        self.register_buffer("alpha", torch.tensor(alpha))


def write_kohya_lora():
    g = torch.Generator().manual_seed(5)
    net = torch.nn.Module()
    for name, kind, fin, fout, r, alpha in KOHYA_MODULES:
        net.add_module(name, LoRAModule(kind, fin, fout, r, alpha, g))
    sd = net.state_dict()
    for k in list(sd.keys()):   # networks/lora.py save_weights with save_dtype=fp16
        sd[k] = sd[k].detach().clone().to("cpu").to(torch.float16)
    assert hasattr(sd, "_metadata")
    torch.save(sd, os.path.join(DATA, "kohya_lora.pt"))
    save_expected(sd, "kohya_lora_expected.safetensors")


# ---- diffusers-style .bin: plain dict, an nn.Parameter -----------------------------------------
def write_diffusers():
    g = torch.Generator().manual_seed(6)
    d = {
        "conv_in.weight": torch.randn(4, 4, 3, 3, generator=g),
        "conv_in.bias": torch.nn.Parameter(torch.randn(4, generator=g), requires_grad=False),
        "time_embedding.linear_1.weight": torch.randn(8, 4, generator=g).to(torch.float16),
    }
    path = os.path.join(DATA, "diffusers.bin")
    torch.save(d, path)
    with zipfile.ZipFile(path) as z:
        pkl = z.read("diffusers/data.pkl")
    assert any(arg == "torch._utils _rebuild_parameter" for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL")
    save_expected(d, "diffusers_expected.safetensors")


# ---- protocol 4 -------------------------------------------------------------------------------
def write_proto4():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(6, 5, generator=g)
    d = collections.OrderedDict()
    d["w"] = w
    d["w_t"] = w.t()
    d["i8"] = torch.arange(-4, 4, dtype=torch.int8)
    d["flag"] = torch.tensor([True, False, True])
    path = os.path.join(DATA, "proto4.pt")
    torch.save(d, path, pickle_protocol=4)
    with zipfile.ZipFile(path) as z:
        pkl = z.read("proto4/data.pkl")
    ops = {op.name for op, _, _ in pickletools.genops(pkl)}
    assert {"FRAME", "MEMOIZE", "SHORT_BINUNICODE", "STACK_GLOBAL"} <= ops, ops
    save_expected(d, "proto4_expected.safetensors")


def write_storages():
    """Bare storages as values: torch 1.13 pickles an UntypedStorage as torch.storage.UntypedStorage
    (numel in bytes) and a typed one as its legacy class; neither is a tensor."""
    d = {"raw": torch.UntypedStorage(8), "typed": torch.arange(3, dtype=torch.float32).storage(),
         "w": torch.arange(6, dtype=torch.int16).reshape(2, 3)}
    path = os.path.join(DATA, "storages.pt")
    torch.save(d, path)
    with zipfile.ZipFile(path) as z:
        pkl = z.read("storages/data.pkl")
    assert any(arg == "torch.storage UntypedStorage" for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL")
    save_expected({"w": d["w"]}, "storages_expected.safetensors")


def write_legacy():
    d = collections.OrderedDict(w=torch.arange(4, dtype=torch.float32))
    torch.save(d, os.path.join(DATA, "legacy.pt"), _use_new_zipfile_serialization=False)


# ---- reading the files liblora wrote ---------------------------------------------------------------
# The two checks AUTOMATIC1111's modules/safe.py applies before loading (as spec/safety.md §2.2
# describes them): every record name matches this pattern, and the pickle names only these
# globals. Stubs stand in for the callables: this checks names, not values (torch.load does that).
A1111_NAME_RE = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
A1111_GLOBALS = {
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"), ("torch", "FloatStorage"), ("torch", "HalfStorage"),
    ("torch", "IntStorage"), ("torch", "LongStorage"), ("torch", "DoubleStorage"), ("torch", "ByteStorage"),
    ("torch", "BFloat16Storage"), ("torch", "float32"), ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"), ("numpy", "dtype"),
    ("numpy", "ndarray"), ("_codecs", "encode"), ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("__builtin__", "set"),
}


def a1111_style_check(path):
    """(names_ok, globals outside the allowlist)."""
    forbidden = set()

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in A1111_GLOBALS:
                forbidden.add(f"{module}.{name}")
            return lambda *a, **k: collections.OrderedDict()

        def persistent_load(self, pid):
            assert pid[0] == "storage"
            return None

    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        names_ok = all(A1111_NAME_RE.match(n) for n in names)
        pkl = [n for n in names if n.endswith("/data.pkl")]
        Restricted(io.BytesIO(z.read(pkl[0]))).load()
    return names_ok, sorted(forbidden)


def check_ours(paths):
    """torch.load (both modes) on each file ckpt_write wrote; the values must be the formulas."""
    want_dtype_name = {v: k for k, v in make_fixtures.TORCH_DTYPES.items()}
    result = {"torch_version": torch.__version__, "numpy_version": np.__version__,
              "safetensors_version": safetensors.__version__, "files": {}}
    errors = []
    for path in paths:
        base = os.path.basename(path)
        rep = {}
        for wo in (False, True):
            obj = torch.load(path, weights_only=wo)
            key = "weights_only_true" if wo else "weights_only_false"
            sd = obj["state_dict"] if isinstance(obj, dict) and "state_dict" in obj else obj
            rep[key] = {
                "top_type": type(obj).__name__,
                "top_keys": list(obj.keys()) if "state_dict" in obj else None,
                "state_dict_type": type(sd).__name__,
                "epoch": obj.get("epoch") if "state_dict" in obj else None,
                "global_step": obj.get("global_step") if "state_dict" in obj else None,
            }
            tensors = {}
            if sorted(sd.keys()) != sorted(make_fixtures.ALL_DTYPES):
                errors.append(f"{base} ({key}): names {sorted(sd.keys())}")
            for name, t in sd.items():
                want = make_fixtures.formula_tensor(name) if name in make_fixtures.ALL_DTYPES else None
                same = (want is not None and t.dtype == want.dtype and list(t.shape) == list(want.shape)
                        and torch.equal(t, want))
                if not same:
                    errors.append(f"{base} ({key}): tensor {name} differs from the formula")
                tensors[name] = {"dtype": want_dtype_name[t.dtype], "shape": list(t.shape),
                                 "sum": float(t.to(torch.float64).sum().item()), "equals_formula": same,
                                 "contiguous": t.is_contiguous(), "storage_offset": t.storage_offset()}
            rep[key]["tensors"] = tensors
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            rep["zip"] = {
                "names": [i.filename for i in infos],
                "all_stored": all(i.compress_type == zipfile.ZIP_STORED for i in infos),
                "testzip_ok": z.testzip() is None,
            }
        with open(path, "rb") as f:
            raw = f.read()
        aligned = True
        for i in infos:   # data offset = local header + 30 + name + extra, from the local header
            n, x = int.from_bytes(raw[i.header_offset + 26:i.header_offset + 28], "little"), \
                int.from_bytes(raw[i.header_offset + 28:i.header_offset + 30], "little")
            aligned &= (i.header_offset + 30 + n + x) % 64 == 0
        rep["zip"]["data_aligned_64"] = aligned
        # A1111's list has no storage type for int16, int8 and bool: a file with such tensors
        # (ours has all dtypes) is refused there whoever wrote it; nothing else may be outside.
        names_ok, forbidden = a1111_style_check(path)
        rep["a1111_style"] = {"names_ok": names_ok, "forbidden_globals": forbidden}
        if not names_ok or not set(forbidden) <= {"torch.ShortStorage", "torch.CharStorage", "torch.BoolStorage"}:
            errors.append(f"{base}: fails the A1111-style restricted check: names {names_ok}, globals {forbidden}")
        result["files"][base] = rep
    if errors:
        for e in errors:
            print("ERROR:", e, file=sys.stderr)
        sys.exit(1)
    with open(os.path.join(HERE, "torch_reads_our_ckpt.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, sort_keys=True)
        f.write("\n")
    for path in paths:
        dst = os.path.join(DATA, os.path.basename(path))
        if os.path.abspath(path) != os.path.abspath(dst):
            shutil.copyfile(path, dst)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", action="append", default=[],
                    help="a checkpoint written by ckpt_write (test_ckpt --write-ours DIR) to check and copy")
    args = ap.parse_args()
    os.makedirs(DATA, exist_ok=True)
    for fn in (write_all_dtypes, write_views, write_sd_lightning, write_kohya_lora, write_diffusers, write_proto4,
               write_storages, write_legacy):
        fn()
    print("wrote the fixtures in", os.path.relpath(DATA))
    if args.ours:
        r = check_ours(args.ours)
        print("torch", r["torch_version"], "read", ", ".join(args.ours), "OK")


if __name__ == "__main__":
    main()
