"""JPEG/WebP output (lib/io/image_write.c) against A1111's own EXIF path.

    tests/reference/.venv/bin/python tests/reference/make_imgout_fixtures.py
        writes tests/data/imgout/exif.json: for each text, the bytes A1111's save_image_with_geninfo
        inserts (piexif.dump({"Exif": {UserComment: piexif.helper.UserComment.dump(text,
        encoding="unicode")}})), which tests/io/test_image_write.c compares ours with.
    tests/reference/.venv/bin/python tests/reference/make_imgout_fixtures.py --check DIR
        reads DIR/text<i>.jpg and DIR/text<i>.webp (written by `test_image_write DIR`) the way
        A1111's PNG Info tab does (modules/images.py read_info_from_image: PIL's info["exif"],
        piexif.load, piexif.helper.UserComment.load) and writes
        tests/reference/a1111_reads_ours.json: the text read back per file, whether it equals
        the text written, and Pillow's format and size.

Versions: piexif 1.1.3 (pinned in requirements.txt; A1111 pins the same), Debian's Pillow 9.4.
"""
import json
import os
import sys

import piexif
import piexif.helper

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "data", "imgout")

TEXTS = [
    "a photo of a cat, (masterpiece:1.2)\nNegative prompt: blurry, lowres\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 1234, Size: 64x64, Model hash: 0123456789, "
    "Lora hashes: \"v_kohya: abcdef012345\", Version: liblora 0.2.0",
    "h\u00e9llo \u2713 \u65e5\u672c\u8a9e \U0001F600 \"quoted\" back\\slash\ttab",
    "x",
]


def a1111_read(path):
    """modules/images.py read_info_from_image, the EXIF branch."""
    from PIL import Image
    with Image.open(path) as im:
        items = (im.info or {}).copy()
        fmt, size = im.format, list(im.size)
    geninfo = items.pop("parameters", None)
    if "exif" in items:
        exif_data = items.pop("exif")
        try:
            exif = piexif.load(exif_data)
        except OSError:
            exif = None
        exif_comment = (exif or {}).get("Exif", {}).get(piexif.ExifIFD.UserComment, b"")
        try:
            exif_comment = piexif.helper.UserComment.load(exif_comment)
        except ValueError:
            exif_comment = exif_comment.decode("utf8", errors="ignore")
        if exif_comment:
            geninfo = exif_comment
    return geninfo, fmt, size


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--check":
        d = sys.argv[2]
        res = {"piexif": piexif.VERSION, "files": {}}
        from PIL import __version__ as pil_version
        res["pillow"] = pil_version
        for i, t in enumerate(TEXTS):
            for ext in ("jpg", "webp", "lossless.webp"):
                name = "text%d.%s" % (i, ext)
                got, fmt, size = a1111_read(os.path.join(d, name))
                res["files"][name] = {"read": got, "equals_written": got == t, "format": fmt, "size": size}
        with open(os.path.join(HERE, "a1111_reads_ours.json"), "w") as f:
            json.dump(res, f, indent=1, sort_keys=True, ensure_ascii=True)
            f.write("\n")
        bad = [k for k, v in res["files"].items() if not v["equals_written"]]
        print("A1111 reader:", "all texts read back" if not bad else "MISMATCH in %s" % bad)
        return 1 if bad else 0
    os.makedirs(OUT, exist_ok=True)
    cases = []
    for t in TEXTS:
        b = piexif.dump({"Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump(t, encoding="unicode")}})
        cases.append({"text": t, "piexif_dump_hex": b.hex()})
    with open(os.path.join(OUT, "exif.json"), "w") as f:
        json.dump({"piexif": piexif.VERSION, "cases": cases}, f, indent=1, ensure_ascii=True)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
