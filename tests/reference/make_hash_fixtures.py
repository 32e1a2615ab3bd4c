"""Expected file hashes for tests/io/test_file_hash.c (lora_file_hash), computed by kohya-ss
sd-scripts' own functions (library/train_util.py: calculate_sha256, model_hash,
addnet_hash_safetensors) and cross-checked with plain hashlib.

    tests/reference/.venv/bin/python tests/reference/make_hash_fixtures.py [/tmp/kohya-full]

Writes tests/data/hash/hashes.json:
  "files":    {name in tests/data: {sha256, addnet, legacy}}  (committed fixtures)
  "patterns": [{size, sha256, legacy}]  files the C test writes itself, byte i of which is
              pattern_byte(i) below (sizes around the 1 MiB + 64 KiB legacy window)
The kohya functions are taken from train_util.py by name (ast) and executed as written, so
their module's imports are not needed.
"""
import ast
import hashlib
import json
import os
import sys
import tempfile
from io import BytesIO

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data")
KOHYA = sys.argv[1] if len(sys.argv) > 1 else "/tmp/kohya-full"
WANT = ["model_hash", "calculate_sha256", "addnet_hash_safetensors"]
SIZES = [0, 1000, 0x100000, 0x100000 + 0x8000, 0x110000, 0x110000 + 4321]


def kohya_functions():
    src = open(os.path.join(KOHYA, "library", "train_util.py"), encoding="utf-8").read()
    tree = ast.parse(src)
    mod = ast.Module(body=[n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in WANT],
                     type_ignores=[])
    g = {"hashlib": hashlib, "BytesIO": BytesIO}
    exec(compile(mod, "train_util.py", "exec"), g)
    return g


def pattern_byte(i):
    # the C test writes the same bytes: ((i * 131) ^ (i >> 11)) & 0xFF
    return ((i * 131) ^ (i >> 11)) & 0xFF


def pattern(n):
    return bytes(pattern_byte(i) for i in range(n))


def main():
    k = kohya_functions()
    out = {"files": {}, "patterns": []}
    for name in ("py_lora_kohya.safetensors", "py_all_dtypes.safetensors"):
        p = os.path.join(DATA, name)
        with open(p, "rb") as f:
            raw = f.read()
            f.seek(0)
            addnet = k["addnet_hash_safetensors"](f)
        sha = k["calculate_sha256"](p)
        assert sha == hashlib.sha256(raw).hexdigest()
        n = int.from_bytes(raw[:8], "little")
        assert addnet == hashlib.sha256(raw[8 + n:]).hexdigest()
        out["files"][name] = {"sha256": sha, "addnet": addnet, "legacy": k["model_hash"](p)}
    with tempfile.TemporaryDirectory() as d:
        for size in SIZES:
            p = os.path.join(d, "pattern.bin")
            b = pattern(size)
            with open(p, "wb") as f:
                f.write(b)
            sha, legacy = k["calculate_sha256"](p), k["model_hash"](p)
            assert sha == hashlib.sha256(b).hexdigest()
            assert legacy == hashlib.sha256(b[0x100000:0x110000]).hexdigest()[:8]
            out["patterns"].append({"size": size, "sha256": sha, "legacy": legacy})
    os.makedirs(os.path.join(DATA, "hash"), exist_ok=True)
    with open(os.path.join(DATA, "hash", "hashes.json"), "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
