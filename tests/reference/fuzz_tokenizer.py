"""Differential check of liblora's tokenizer against transformers 4.25.1's slow CLIPTokenizer
with ftfy 6.1.1, on random text built to hit ftfy's code paths (mojibake in every codec ftfy
tries, partial mojibake, C1 controls, HTML entities, combining marks and Hangul jamo for NFC,
ligatures, full-width forms, quotes, control characters, terminal escapes, line breaks,
special tokens, "!" under v2). A development tool, not part of the test suite:

    ninja -C build
    tests/reference/.venv/bin/python tests/reference/fuzz_tokenizer.py [N] [SEED] [build/lib/liblora.so]

Prints every mismatch (input repr, reference ids, liblora ids) and exits 1 if there was one.
"""
import ctypes
import html.entities
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_tokenizer_fixtures as F  # noqa: E402

from ftfy import badness, chardata  # noqa: E402

ABI = 0


def load_lib(path):
    lib = ctypes.CDLL(path)
    lib.lora_ctx_create.argtypes = [ctypes.c_uint32, ctypes.POINTER(ctypes.c_void_p)]
    lib.lora_tokenizer_create.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p)]
    lib.lora_tokenizer_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int32),
                                            ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]
    lib.lora_errmsg.restype = ctypes.c_char_p
    lib.lora_errmsg.argtypes = [ctypes.c_void_p]
    return lib


def ours(lib, ctx, tok, text):
    b = text.encode("utf-8")
    n = ctypes.c_size_t()
    buf = (ctypes.c_int32 * (4 * len(b) + 16))()
    s = lib.lora_tokenizer_tokenize(tok, b, buf, len(buf), ctypes.byref(n))
    if s != 0:
        return "error %d: %s" % (s, lib.lora_errmsg(ctx).decode())
    return list(buf[:n.value])


def pieces():
    mojibake_chars = set()
    for chars in list(badness.MOJIBAKE_CATEGORIES.values()) + list(chardata.UTF8_CLUES.values()):
        i = 0
        while i < len(chars):
            if i + 2 < len(chars) and chars[i + 1] == "-":
                mojibake_chars.update(chr(c) for c in range(ord(chars[i]), ord(chars[i + 2]) + 1))
                i += 3
            else:
                mojibake_chars.add(chars[i])
                i += 1
    mojibake_chars = sorted(mojibake_chars)
    words = ["café", "naïve", "résumé", "über", "Ελληνικά", "русский", "日本語", "한국어", "emoji 😀🎨",
             "à la mode", "São Paulo", "“quoted”", "it’s", "ﬁne ﬂower", "Ａｎｉｍｅ", "ｶﾀｶﾅ", "…", "—", "€5",
             "€", "™", "é", "ü", "ß", "Ω", "♥", "✔", "🙂", "ção", "ñ", "ø", "Å", "ǅ", "Ĳ", "¿", "¡", "°", "µ", "×"]
    entities = ["&" + k for k in list(html.entities.html5)[::7] if k.endswith(";")][:300] + \
        ["&#39;", "&#x27;", "&#128512;", "&#x1F600;", "&#0;", "&#13;", "&#128;", "&#150;", "&#59;", "&#x3b;",
         "&#xD800;", "&#99999999;", "&#1;", "&#65534;", "&#x10FFFF;", "&#12a;", "&#x;", "&#;", "&EACUTE;",
         "&NTILDE;", "&nTILDE;", "&SZLIG;", "&amp", "&amp;amp;", "&lt;", "&gt;", "&nbsp;", "&quot;"]
    codecs = ["latin-1", "sloppy-windows-1252", "sloppy-windows-1251", "sloppy-windows-1250",
              "sloppy-windows-1253", "sloppy-windows-1254", "iso-8859-2", "macroman", "cp437", "windows-1252"]
    specials = ["<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "!", "!!", " ! ", "<", ">", "&", "'s", "'LL",
                "'ſ", "\u0345", "ΣΑΣ", "ΟΔΟΣ", "Σ.", "İ", "K", "\u212a", "ǅ"]
    misc = ["\r\n", "\r", "\n", "\t", "\x0b", "\x0c", "\x1b[31m", "\x1b[0;1m", "\x1b[", "\x7f", "\x85", "\u2028",
            "\u00a0", "\u200b", "\u200d", "\ufeff", "\u2060", "\u206a", "\ufffc", "\ufffd", "\x1a", "\x1c",
            "\u0301", "\u0308", "\u0323", "\u0327", "e\u0301", "a\u0308\u0301", "\u1100\u1161", "\u1100\u1161\u11a8",
            "\uac00\u11a8", "\u0b47\u0b3e", "\u212b", "\u2126", "Å", "ﬀ", "ﬃ", "ſt", "ﬆ", "\u3000", "？", "！"]

    def mojibake(rng):
        w = rng.choice(words)
        for _ in range(rng.choice([1, 1, 1, 2])):
            enc = rng.choice(codecs)
            try:
                w = w.encode("utf-8").decode(enc)
            except UnicodeDecodeError:
                w = w.encode("utf-8").decode(enc, "replace")
        if rng.random() < 0.2:
            w = w.replace("\u00a0", " ")
        if rng.random() < 0.1:
            w = w.replace(rng.choice(w), "\ufffd") if w else w
        return w

    return mojibake_chars, words, entities, specials, misc, mojibake


def random_text(rng, P):
    mojibake_chars, words, entities, specials, misc, mojibake = P
    if rng.random() < 0.3:
        # dense: short strings over the characters ftfy's heuristics look at
        alphabet = mojibake_chars + list("abcxyzABCXYZ .,?!\n") + ["\u00a0", "\u00c3", "\u00c2", "\u00d8",
                                                                     "\u221a", "\u201a", "\u0432", "\u0413"]
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
    parts = []
    for _ in range(rng.randint(1, 8)):
        r = rng.random()
        if r < 0.25:
            parts.append(mojibake(rng))
        elif r < 0.40:
            parts.append("".join(rng.choice(mojibake_chars) for _ in range(rng.randint(1, 4))))
        elif r < 0.50:
            parts.append(rng.choice(entities))
        elif r < 0.60:
            parts.append(rng.choice(specials))
        elif r < 0.72:
            parts.append(rng.choice(misc))
        elif r < 0.82:
            parts.append(rng.choice(words))
        elif r < 0.90:
            parts.append(" " * rng.randint(1, 2))
        else:
            parts.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz ,.'()[]:0123456789") for _ in range(rng.randint(1, 12))))
    return "".join(parts)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    path = sys.argv[3] if len(sys.argv) > 3 else os.path.join(HERE, "..", "..", "build", "lib", "liblora.so")
    lib = load_lib(path)
    ctx = ctypes.c_void_p()
    assert lib.lora_ctx_create(ABI, ctypes.byref(ctx)) == 0
    toks = {}
    refs = F.reference_tokenizers()
    for flavour, name in ((1, "v1"), (2, "v2")):
        t = ctypes.c_void_p()
        assert lib.lora_tokenizer_create(ctx, flavour, ctypes.byref(t)) == 0
        toks[name] = t
    rng = random.Random(seed)
    P = pieces()
    bad = 0
    for i in range(n):
        text = random_text(rng, P)
        for name in ("v1", "v2"):
            want = refs[name](text, add_special_tokens=False).input_ids
            got = ours(lib, ctx, toks[name], text)
            if got != want:
                bad += 1
                print("MISMATCH %s %r\n  ref  %s\n  ours %s" % (name, text, want, got))
    print("%d texts x 2 flavours, %d mismatches" % (n, bad))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
