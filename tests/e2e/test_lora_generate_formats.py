"""`lora generate --output_format jpg|webp` and the hashes in A1111's "parameters", end to end
on the tiny SD v1 model of test_lora_generate.py:
  * JPEG and WebP (lossy and --webp_lossless) files named like the PNGs, carrying the same
    "parameters" text as the PNG of the same seed, read back with an independent EXIF reader
    (struct only: JPEG APP1 / WebP RIFF chunks, TIFF IFDs of either byte order, Exif IFD
    pointer 0x8769, UserComment 0x9286 with A1111's "UNICODE\\0" + UTF-16BE) and, when PIL and
    piexif import (the reference venv), with A1111's own read_info_from_image steps;
  * "Lora hashes": the first 12 hex of sshs_model_hash from the file's metadata (read here
    from the JSON header), else of hashlib.sha256 of the data region (.safetensors without the
    key) or of the whole file (.pt), as A1111 computes them;
  * bad --output_format / --jpeg_quality refused.
The checkpoint is a Diffusers folder, which has no A1111 model hash (no "Model hash" field);
lora_file_hash itself is checked against kohya in tests/io/test_file_hash.c."""
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_lora_generate import read_png, run, widen_text_encoder  # noqa: E402

data = os.environ["LORA_TEST_DATA"]
passed = failed = 0


def check(cond, what):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print("FAIL:", what, file=sys.stderr)


def tiff_user_comment(t):
    """UserComment bytes from a TIFF block, following IFD0's Exif IFD pointer."""
    e = {b"II": "<", b"MM": ">"}[t[:2]]
    assert struct.unpack(e + "H", t[2:4])[0] == 42

    def entries(off):
        n = struct.unpack(e + "H", t[off:off + 2])[0]
        for i in range(n):
            tag, typ, cnt = struct.unpack(e + "HHI", t[off + 2 + 12 * i:off + 10 + 12 * i])
            yield tag, typ, cnt, off + 10 + 12 * i
    ifd0 = struct.unpack(e + "I", t[4:8])[0]
    for tag, typ, cnt, vp in entries(ifd0):
        if tag == 0x8769:
            exif_ifd = struct.unpack(e + "I", t[vp:vp + 4])[0]
            for tag2, typ2, cnt2, vp2 in entries(exif_ifd):
                if tag2 == 0x9286 and typ2 == 7:
                    off = struct.unpack(e + "I", t[vp2:vp2 + 4])[0] if cnt2 > 4 else vp2
                    return t[off:off + cnt2]
    return None


def exif_text(path):
    """("jpeg"|"webp", chunk kinds, the UserComment decoded as A1111 does) by struct only."""
    with open(path, "rb") as f:
        b = f.read()
    tiff, kinds = None, []
    if b[:2] == b"\xff\xd8":
        pos = 2
        while pos + 4 <= len(b) and b[pos] == 0xFF and b[pos + 1] not in (0xDA, 0xD9):
            n = struct.unpack(">H", b[pos + 2:pos + 4])[0]
            kinds.append(b[pos + 1])
            seg = b[pos + 4:pos + 2 + n]
            if b[pos + 1] == 0xE1 and seg[:6] == b"Exif\0\0" and tiff is None:
                tiff = seg[6:]
            pos += 2 + n
        fmt = "jpeg"
    else:
        assert b[:4] == b"RIFF" and b[8:12] == b"WEBP" and struct.unpack("<I", b[4:8])[0] == len(b) - 8
        pos = 12
        while pos + 8 <= len(b):
            typ, n = b[pos:pos + 4], struct.unpack("<I", b[pos + 4:pos + 8])[0]
            kinds.append(typ.decode())
            if typ == b"EXIF":
                tiff = b[pos + 8:pos + 8 + n]
                if tiff[:6] == b"Exif\0\0":
                    tiff = tiff[6:]
            if typ == b"VP8X":
                kinds.append("flags=%d" % b[pos + 8])
            pos += 8 + n + (n & 1)
        assert pos == len(b)
        fmt = "webp"
    uc = tiff_user_comment(tiff) if tiff else None
    text = uc[8:].decode("utf-16-be") if uc and uc[:8] == b"UNICODE\0" else None
    return fmt, kinds, text


def a1111_text(path):
    """modules/images.py read_info_from_image (the EXIF branch), if PIL and piexif import."""
    try:
        from PIL import Image
        import piexif
        import piexif.helper
    except ImportError:
        return None
    with Image.open(path) as im:
        items = dict(im.info or {})
    exif = piexif.load(items["exif"])
    return piexif.helper.UserComment.load(exif["Exif"][piexif.ExifIFD.UserComment])


def header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n)), f.read()


def main():
    tmp = tempfile.mkdtemp(prefix="lora_generate_formats_")
    try:
        model = os.path.join(tmp, "v1")
        shutil.copytree(os.path.join(data, "sd", "v1_diffusers"), model)
        for sub in ("unet", "vae", "text_encoder"):
            for fn in ("diffusion_pytorch_model.bin", "pytorch_model.bin"):
                p = os.path.join(model, sub, fn)
                if os.path.exists(p):
                    os.remove(p)
        widen_text_encoder(model)
        net = os.path.join(data, "network", "v1_kohya.safetensors")
        _, hdr, _ = header(net)
        sshs = hdr["__metadata__"]["sshs_model_hash"]

        def gen(sub, extra):
            out = os.path.join(tmp, sub)
            r = run(["--ckpt", model, "--outdir", out, "--W", "64", "--H", "64", "--steps", "2", "--seed", "11",
                     "--prompt", "a cat, h\u00e9llo \u65e5\u672c --n blurry", "--network_module", "networks.lora",
                     "--network_weights", net, "--network_mul", "0.8"] + extra)
            return r, r.stdout.split()

        r, files = gen("png", [])
        check(r.returncode == 0 and len(files) == 1, "PNG run")
        params = read_png(files[0])[3].get("parameters", "") if files else ""
        check('Lora hashes: "v1_kohya: %s"' % sshs[:12] in params, "Lora hashes from sshs_model_hash: %r" % params)
        check("Model hash" not in params, "no model hash for a Diffusers folder")

        for sub, extra, ext, chunk in (("jpg", ["--output_format", "jpg", "--jpeg_quality", "90"], ".jpg", None),
                                       ("webp", ["--output_format", "webp"], ".webp", "VP8 "),
                                       ("webpl", ["--output_format", "WEBP", "--webp_lossless"], ".webp", "VP8L")):
            r, files = gen(sub, extra + ["--no_model_hash"])
            check(r.returncode == 0 and len(files) == 1, "%s run" % sub)
            if not files:
                continue
            f = files[0]
            check(f.endswith("_11" + ext), "file name %s" % f)
            fmt, kinds, text = exif_text(f)
            check(text == params, "%s: EXIF UserComment %r equals the PNG parameters %r" % (sub, text, params))
            if fmt == "jpeg":
                check(kinds[0] == 0xE1, "JPEG: APP1 right after SOI (%r)" % kinds)
            else:
                check(kinds[:2] == ["VP8X", "flags=8"] and chunk in kinds and kinds[-1] == "EXIF",
                      "WebP chunks %r" % kinds)
            a = a1111_text(f)
            if a is None:
                print("note: PIL/piexif not importable here; A1111's reader not run on %s "
                      "(see tests/reference/a1111_reads_ours.json)" % sub)
            else:
                check(a == params, "%s: A1111's read_info_from_image gives %r" % (sub, a))

        # fallback hashes: a .safetensors without sshs_* (addnet hash of the data region) and a .pt
        n, hd, blob = header(net)
        meta = {k: v for k, v in hd["__metadata__"].items() if not k.startswith("sshs_")}
        hd["__metadata__"] = meta
        h = json.dumps(hd).encode()
        nohash = os.path.join(tmp, "nohash.safetensors")
        with open(nohash, "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h + blob)
        want1 = hashlib.sha256(blob).hexdigest()[:12]
        pt = os.path.join(tmp, "te.pt")
        shutil.copy(os.path.join(data, "network", "v1_te_fp16.pt"), pt)
        with open(pt, "rb") as f:
            want2 = hashlib.sha256(f.read()).hexdigest()[:12]
        out = os.path.join(tmp, "fallback")
        r = run(["--ckpt", model, "--outdir", out, "--W", "64", "--H", "64", "--steps", "1", "--seed", "3",
                 "--prompt", "x", "--network_module", "networks.lora", "networks.lora", "--network_weights", nohash,
                 pt, "--network_mul", "0.5", "0.5"])
        check(r.returncode == 0, "fallback run")
        files = r.stdout.split()
        p = read_png(files[0])[3].get("parameters", "") if files else ""
        check('Lora hashes: "nohash: %s, te: %s"' % (want1, want2) in p, "computed Lora hashes: %r" % p)

        # refused options
        for extra, what in ((["--output_format", "gif"], "gif"), (["--jpeg_quality", "101"], "quality 101")):
            r, _ = gen("bad", extra)
            check(r.returncode == 2 and "output_format" in r.stderr, "%s refused" % what)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("test_lora_generate_formats: %d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
