"""The ctypes binding against the built library: versions, errors as exceptions with the
library's message, parameters by kohya name, and a safetensors file written here by hand."""
import json
import os
import struct
import sys
import tempfile

sys.path.insert(0, os.environ["LORA_BINDINGS_PYTHON"])
import liblora  # noqa: E402

passed = failed = 0


def check(cond, what):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print("FAIL:", what, file=sys.stderr)


check(liblora.version().count(".") == 2, "version string")
with liblora.Context() as ctx:
    p = ctx.params(network_dim=16, learning_rate=1e-4, resolution="512,768", cache_latents=True)
    check(p["network_dim"] == 16, "int param")
    check(abs(p["learning_rate"] - 1e-4) < 1e-18, "float param")
    check(p["resolution"] == "512,768", "string param")
    check(p["cache_latents"] == 1, "bool param")
    try:
        p["network_dim"] = 0
        check(False, "range error not raised")
    except liblora.LoraError as e:
        check(e.name == "LORA_E_CONFIG_RANGE" and e.category == 4 and "network_dim" in str(e), str(e))
    p.close()

    # A safetensors file built byte by byte from the format description.
    header = {"__metadata__": {"ss_network_dim": "4"},
              "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.safetensors")
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(hj)) + hj + struct.pack("<4f", 1.0, -2.0, 0.5, 3.25))
        with ctx.open_file(path) as tf:
            check(tf.tensors() == {"w": ("F32", (2, 2))}, "tensors %r" % tf.tensors())
            check(tf.metadata() == {"ss_network_dim": "4"}, "metadata")
            check(tf.read_f32("w") == [1.0, -2.0, 0.5, 3.25], "values")
        bad = os.path.join(d, "bad.safetensors")
        with open(bad, "wb") as f:
            f.write(b"\x01\x00")
        try:
            ctx.open_file(bad)
            check(False, "bad file accepted")
        except liblora.LoraError as e:
            check(e.name == "LORA_E_ST_HEADER_TOO_SMALL" and bad in str(e), str(e))

# Tokenizer and models through the binding (ids from transformers' CLIPTokenizer; facts from
# the tiny fixtures' diffusers configs).
data = os.environ.get("LORA_TEST_DATA")
with liblora.Context() as ctx:
    tok = ctx.tokenizer()
    ids = tok.encode("a photo of a cat")
    check(ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and len(ids) == 77 and ids[7] == 49407, "tokenizer ids")
    check(ctx.tokenizer(v2=True).encode("a cat")[3:6] == [49407, 0, 0], "v2 pads with id 0 after EOS")
    if data:
        m = ctx.load_model(os.path.join(data, "sd", "v2_diffusers"))
        with open(os.path.join(data, "sd", "v2_diffusers", "unet", "config.json")) as f:
            ucfg = json.load(f)
        check(m["sd_version"] == 2 and m["v_prediction"] == 1, "model version/prediction")
        check(m["context_dim"] == ucfg["cross_attention_dim"], "model context dim")
        with tempfile.TemporaryDirectory() as d:
            m.save(os.path.join(d, "x.safetensors"), save_model_as="safetensors", save_precision="fp16")
            m2 = ctx.load_model(os.path.join(d, "x.safetensors"), v2=True, v_parameterization=True)
            check(m2["tensors"] >= m["tensors"], "saved model reloads")
            m2.close()
        try:
            ctx.load_model(os.path.join(data, "sd", "v1_ldm.safetensors"), v2=True)
            check(False, "v2 flag on a v1 file accepted")
        except liblora.LoraError as e:
            check(e.name == "LORA_E_CONFIG_RANGE", str(e))
        m.close()



def write_bmp(path, w, h, rgb):
    """A 24-bit bottom-up BMP of one colour, from the format description."""
    row = bytes(rgb[::-1]) * w
    row += b"\0" * (-len(row) % 4)
    data = row * h
    hdr = struct.pack("<2sIHHI", b"BM", 54 + len(data), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, len(data), 2835, 2835, 0, 0)
    with open(path, "wb") as f:
        f.write(hdr + info + data)


# Training, networks, runtime attach and generation on the tiny v1 model.
if data:
    with liblora.Context() as ctx, tempfile.TemporaryDirectory() as d:
        sub = os.path.join(d, "train", "2_red")
        os.makedirs(sub)
        for k in range(2):
            write_bmp(os.path.join(sub, "r%d.bmp" % k), 64, 64, (200 + 20 * k, 10, 10))
            with open(os.path.join(sub, "r%d.caption" % k), "w") as f:
                f.write("a red square\n")
        model = ctx.load_model(os.path.join(data, "sd", "v1_diffusers"))
        opts = dict(train_data_dir=os.path.join(d, "train"), output_dir=os.path.join(d, "out"), resolution="64",
                    learning_rate=1e-3, seed=5, max_train_steps=6, network_dim=2)
        net = model.create_network(network_dim=2)
        check(net["rank"] == 2 and net["modules"] == net["te_modules"] + net["unet_modules"] > 0, "created network")
        tr = model.trainer(net, **opts)
        check(tr.step(2) == 2 and tr["step"] == 2, "two optimizer steps")
        check(tr["last_loss"] == tr["last_loss"] and tr["last_loss"] > 0, "finite loss")
        check(abs(tr["lr"] - 1e-3) < 1e-12, "constant scheduler lr %r" % tr["lr"])
        check(tr["batches_per_epoch"] == 4, "2 images x 2 repeats, batch 1 -> 4 batches")
        state = os.path.join(d, "state.safetensors")
        tr.save_state(state)
        net2 = model.create_network(network_dim=2)
        tr2 = model.trainer(net2, **opts)
        tr2.load_state(state)
        tr.step(1)
        tr2.step(1)
        check(tr["last_loss"] == tr2["last_loss"] and tr2["step"] == 3, "resumed trainer continues the same run")
        lora_path = os.path.join(d, "red.safetensors")
        tr.save_network(lora_path)
        tr.close()
        tr2.close()
        with ctx.open_file(lora_path) as lf:
            md = lf.metadata()
            check(md.get("ss_network_dim") == "2" and "sshs_model_hash" in md, "kohya metadata in the saved LoRA")
        loaded = ctx.load_network(lora_path)
        check(loaded["modules"] == net["modules"], "saved LoRA reloads with every module")

        gen = dict(steps=2, W=64, H=64, seed=3, sampler="ddim", scale=7.5)
        base = model.generate("a red square", **gen)
        check((base.width, base.height) == (64, 64) and len(base.pixels()) == 64 * 64 * 3, "image size")
        check("a red square" in (base.text("parameters") or ""), "A1111 parameters text")
        model.attach(loaded, 0.0)
        check(model.attached_count() == 1, "attached")
        zero = model.generate("a red square", **gen)
        check(zero.pixels() == base.pixels(), "multiplier 0 leaves the picture unchanged")
        model.set_multiplier(loaded, 1.0)
        model.detach(loaded)
        again = model.generate("a red square", **gen)
        check(model.attached_count() == 0 and again.pixels() == base.pixels(), "detach restores the model")
        png = os.path.join(d, "x.png")
        base.save_png(png)
        with open(png, "rb") as f:
            b = f.read()
        check(b[:8] == b"\x89PNG\r\n\x1a\n" and b"parameters" in b, "PNG with the parameters chunk")
        for h in (base, zero, again, loaded, net, net2, model):
            h.close()

print("test_python_binding: %d passed, %d failed" % (passed, failed))
sys.exit(1 if failed else 0)
