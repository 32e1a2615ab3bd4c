"""`lora info` against facts read from the files by an independent parser (Python's json
and struct, not liblora): tensor count, dtype counts, total bytes, metadata, and for the
kohya LoRA fixture its module counts, rank range and alpha range."""
import json
import os
import struct
import subprocess
import sys
import tempfile

lora = os.environ["LORA_EXE"]
data = os.environ["LORA_TEST_DATA"]
passed = failed = 0


def check(cond, what):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print("FAIL:", what, file=sys.stderr)


def read_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data_start = 8 + n
        f.seek(0)
        raw = f.read()
    meta = header.pop("__metadata__", {})
    return header, meta, raw, data_start


def half_to_float(b):
    return struct.unpack("<e", b)[0]


def expected(path):
    header, meta, raw, start = read_header(path)
    dtypes = {}
    total = 0
    for info in header.values():
        dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + 1
        total += info["data_offsets"][1] - info["data_offsets"][0]
    exp = {"tensors": len(header), "total_bytes": total, "dtypes": dtypes, "metadata": meta}
    downs = {k: v for k, v in header.items() if k.endswith(".lora_down.weight")}
    if downs:
        ranks = [v["shape"][0] for v in downs.values()]
        alphas = []
        for k, v in header.items():
            if k.endswith(".alpha"):
                a, b = v["data_offsets"]
                alphas.append(half_to_float(raw[start + a:start + b]) if v["dtype"] == "F16"
                              else struct.unpack("<f", raw[start + a:start + b])[0])
        exp["lora"] = {
            "modules": len(downs),
            "text_encoder_modules": sum(k.startswith("lora_te") for k in downs),
            "unet_modules": sum(k.startswith("lora_unet_") for k in downs),
            "conv3x3_modules": sum(len(v["shape"]) == 4 and v["shape"][2] > 1 for v in downs.values()),
            "rank_min": min(ranks), "rank_max": max(ranks),
            "alpha_min": min(alphas), "alpha_max": max(alphas),
        }
    return exp


for name in ("py_lora_kohya.safetensors", "py_all_dtypes.safetensors"):
    path = os.path.join(data, name)
    exp = expected(path)
    r = subprocess.run([lora, "info", "--json", path], capture_output=True, text=True)
    check(r.returncode == 0, "%s: exit %d: %s" % (name, r.returncode, r.stderr))
    got = json.loads(r.stdout)
    for key in ("tensors", "total_bytes", "dtypes", "metadata"):
        check(got.get(key) == exp[key], "%s: %s = %r, want %r" % (name, key, got.get(key), exp[key]))
    check(("lora" in got) == ("lora" in exp), name + ": lora section presence")
    if "lora" in exp:
        for key, want in exp["lora"].items():
            check(got["lora"].get(key) == want, "%s: lora.%s = %r, want %r" % (name, key, got["lora"].get(key), want))
        check(got["lora"]["kind"].startswith("lora"), "kind")
    # the text form carries the same counts
    t = subprocess.run([lora, "info", path], capture_output=True, text=True)
    check(t.returncode == 0 and ("tensors:     %d" % exp["tensors"]) in t.stdout, name + ": text tensor count")
    check(("total bytes: %d" % exp["total_bytes"]) in t.stdout, name + ": text total bytes")
    if "lora" in exp:
        check("rank:        %d..%d" % (exp["lora"]["rank_min"], exp["lora"]["rank_max"]) in t.stdout, "text rank")

# SD checkpoints: facts against the diffusers configs, in every form.
sd = os.path.join(data, "sd")
for v, version in (("v1", 1), ("v2", 2)):
    with open(os.path.join(sd, v + "_diffusers", "unet", "config.json")) as f:
        unet_cfg = json.load(f)
    with open(os.path.join(sd, v + "_diffusers", "text_encoder", "config.json")) as f:
        te_cfg = json.load(f)
    with open(os.path.join(sd, v + "_diffusers", "scheduler", "scheduler_config.json")) as f:
        vpred = int(json.load(f)["prediction_type"] == "v_prediction")
    for form in (v + "_ldm.safetensors", v + "_ldm.ckpt", v + "_diffusers"):
        r = subprocess.run([lora, "info", "--json", os.path.join(sd, form)], capture_output=True, text=True)
        check(r.returncode == 0, form + ": " + r.stderr)
        if r.returncode:
            continue
        m = json.loads(r.stdout)["model"]
        check(m["sd_version"] == version, form + " version")
        check(m["context_dim"] == unet_cfg["cross_attention_dim"], form + " context_dim")
        check(m["unet_channels"] == unet_cfg["block_out_channels"][0], form + " channels")
        check(m["linear_projection"] == int(unet_cfg["use_linear_projection"]), form + " linear projection")
        check(m["text_encoder_layers"] == te_cfg["num_hidden_layers"], form + " te layers")
        check(m["text_encoder_width"] == te_cfg["hidden_size"], form + " te width")
        # LDM files do not record the prediction type; the diffusers scheduler config does
        check(m["v_prediction"] == (vpred if form.endswith("diffusers") else 0), form + " v_prediction")

# `lora convert`: LDM -> .ckpt -> LDM gives the original file byte for byte.
with tempfile.TemporaryDirectory() as d:
    src = os.path.join(sd, "v2_ldm.safetensors")
    ck = os.path.join(d, "m.ckpt")
    back = os.path.join(d, "back.safetensors")
    r1 = subprocess.run([lora, "convert", src, ck], capture_output=True, text=True)
    r2 = subprocess.run([lora, "convert", ck, back, "--v2"], capture_output=True, text=True)
    check(r1.returncode == 0 and r2.returncode == 0, "convert: " + r1.stderr + r2.stderr)
    with open(src, "rb") as a, open(back, "rb") as b:
        check(a.read() == b.read(), "convert round trip is not byte-identical")
    r = subprocess.run([lora, "convert", src, os.path.join(d, "x.ckpt"), "--save_precision", "fp8"],
                       capture_output=True, text=True)
    check(r.returncode != 0 and "LORA_E_CONFIG_RANGE" in r.stderr and "save_precision" in r.stderr, r.stderr)
    check(not os.path.exists(os.path.join(d, "x.ckpt")), "a refused convert wrote a file")

# Errors: non-zero exit, the library's message and status on stderr, nothing on stdout.
with tempfile.TemporaryDirectory() as d:
    bad = os.path.join(d, "truncated.safetensors")
    with open(os.path.join(data, "py_all_dtypes.safetensors"), "rb") as f:
        blob = f.read()
    with open(bad, "wb") as f:
        f.write(blob[:-2])
    r = subprocess.run([lora, "info", bad], capture_output=True, text=True)
    check(r.returncode != 0 and r.stdout == "", "bad file: exit %d" % r.returncode)
    check("LORA_E_ST_INCOMPLETE" in r.stderr and bad in r.stderr, "bad file message: " + r.stderr)
    r = subprocess.run([lora, "info", os.path.join(d, "missing.safetensors")], capture_output=True, text=True)
    check(r.returncode != 0 and "LORA_E_NOT_FOUND" in r.stderr, "missing file: " + r.stderr)
    r = subprocess.run([lora, "frobnicate"], capture_output=True, text=True)
    check(r.returncode == 2 and "unknown command" in r.stderr, "unknown command")

print("test_lora_info: %d passed, %d failed" % (passed, failed))
sys.exit(1 if failed else 0)
