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

print("test_python_binding: %d passed, %d failed" % (passed, failed))
sys.exit(1 if failed else 0)
