"""Writes lib/model/tokenizer_tables.c: the Unicode and text-repair data the CLIP tokenizer
(lib/model/tokenizer.c, lib/model/text_fix.c) needs, read from the very Python modules whose
behaviour the tokenizer reproduces. The output is committed; rerun this only to move to other
versions of them (and then regenerate tests/data/tokenizer/reference_ids.json as well):

    tests/reference/.venv/bin/python lib/model/gen_tokenizer_tables.py lib/model/tokenizer_tables.c

Sources, by what transformers 4.25.1's slow CLIPTokenizer calls:
  * ftfy.fix_text (ftfy 6.1.1): its character classes for mojibake detection, the codecs it
    tries, its HTML entity table, ligature and width maps; Python's `re` \\s \\w \\d; the
    `unicodedata` NFC data (Python 3.11, Unicode 14.0.0).
  * whitespace_clean: `regex` module \\s; str.strip: str.isspace.
  * str.lower: full lower-case mappings and the Final_Sigma context (Cased, Case_Ignorable).
  * the split pattern (`regex` module, IGNORECASE): which characters match [\\p{L}], [\\p{N}]
    and [^\\s\\p{L}\\p{N}], and the case-insensitive equivalents of the letters in its literals.

Every table is computed by asking those modules about every code point; nothing is typed in.
"""
import html
import html.entities
import re
import sys
import unicodedata

import regex

import ftfy
import ftfy.bad_codecs  # noqa: F401  (registers the sloppy-* codecs)
from ftfy import badness, chardata

MAX_CP = 0x110000
SURR = range(0xD800, 0xE000)

out_lines = []


def emit(s=""):
    out_lines.append(s)


def c_array(ctype, name, values, per_line=12, fmt="{}"):
    emit("const %s %s[%d] = {" % (ctype, name, len(values)))
    for i in range(0, len(values), per_line):
        emit("    " + ", ".join(fmt.format(v) for v in values[i:i + per_line]) + ",")
    emit("};")


def two_level(name, ctype, values, shift):
    """Stage-1 block index + deduplicated stage-2 blocks of 1 << shift entries."""
    bs = 1 << shift
    blocks, index, stage1 = [], {}, []
    for b in range(0, MAX_CP, bs):
        blk = tuple(values[b:b + bs])
        if blk not in index:
            index[blk] = len(blocks)
            blocks.append(blk)
        stage1.append(index[blk])
    assert len(blocks) < 65536
    c_array("uint16_t", name + "_stage1", stage1, 16)
    flat = [v for blk in blocks for v in blk]
    c_array(ctype, name + "_stage2", flat, 16)
    return len(blocks)


def utf8_bytes_c(s):
    return "".join("\\x%02x" % b for b in s.encode("utf-8"))


def main(path):
    # ---------------------------------------------------------------- per-code-point props
    props = [0] * MAX_CP
    ccc = [0] * MAX_CP
    lower = {}
    decomp = {}
    comp = {}
    second_of_pair = set()

    P = dict(RX_L=0x0001, RX_N=0x0002, RX_P=0x0004, RX_S=0x0008, PY_SPACE=0x0010, RE_W=0x0020,
             RE_D=0x0040, CASED=0x0080, CASE_IGN=0x0100, HAS_LOWER=0x0200, NFC_UNSTABLE=0x0400)

    rx_l = regex.compile(r"[\p{L}]", regex.IGNORECASE)
    rx_n = regex.compile(r"[\p{N}]", regex.IGNORECASE)
    rx_p = regex.compile(r"[^\s\p{L}\p{N}]", regex.IGNORECASE)
    rx_s = regex.compile(r"\s")
    re_s = re.compile(r"\s")
    re_w = re.compile(r"\w")
    re_d = re.compile(r"\d")

    for cp in range(MAX_CP):
        if cp in SURR:
            continue
        c = chr(cp)
        v = 0
        if rx_l.fullmatch(c):
            v |= P["RX_L"]
        if rx_n.fullmatch(c):
            v |= P["RX_N"]
        if rx_p.fullmatch(c):
            v |= P["RX_P"]
        if rx_s.fullmatch(c):
            v |= P["RX_S"]
        if c.isspace():
            v |= P["PY_SPACE"]
        assert bool(re_s.fullmatch(c)) == c.isspace()
        if re_w.fullmatch(c):
            v |= P["RE_W"]
        if re_d.fullmatch(c):
            v |= P["RE_D"]
        # Final_Sigma probes: "x" + SIGMA is final iff x is cased (and not skipped as
        # case-ignorable); "A" + x + SIGMA is final iff x is case-ignorable or cased.
        b = (c + "\u03a3").lower()[-1] == "\u03c2"
        a = ("A" + c + "\u03a3").lower()[-1] == "\u03c2"
        if b:
            v |= P["CASED"]
        elif a:
            v |= P["CASE_IGN"]
        lo = c.lower()
        if lo != c and cp != 0x3A3:
            v |= P["HAS_LOWER"]
            lower[cp] = lo
        ccc[cp] = unicodedata.combining(c)
        d = unicodedata.decomposition(c)
        if d and not d.startswith("<") and not (0xAC00 <= cp <= 0xD7A3):
            parts = [int(x, 16) for x in d.split()]
            full = unicodedata.normalize("NFD", c)
            decomp[cp] = [ord(x) for x in full]
            if len(parts) == 2 and unicodedata.normalize("NFC", c) == c:
                comp[(parts[0], parts[1])] = cp
                second_of_pair.add(parts[1])
        props[cp] = v
    # The tokenizer skips a code point matching none of the three split classes exactly as it
    # skips white space.
    for cp in range(MAX_CP):
        if cp in decomp or ccc[cp] != 0 or cp in second_of_pair:
            props[cp] |= P["NFC_UNSTABLE"]
    # Hangul jamo V and T compose algorithmically with a preceding L / LV.
    for cp in list(range(0x1161, 0x1176)) + list(range(0x11A8, 0x11C3)):
        props[cp] |= P["NFC_UNSTABLE"]
    # str.lower of U+03A3 depends on context and is handled in code.
    assert "\u03a3".lower() == "\u03c3" and "A\u03a3".lower() == "a\u03c2"
    assert max(len(s) for s in lower.values()) <= 3
    assert max(len(d) for d in decomp.values()) <= 4

    emit("/* Generated by lib/model/gen_tokenizer_tables.py: do not edit.")
    emit(" * Python %s, unicodedata %s, regex %s, ftfy %s. */" % (
        sys.version.split()[0], unicodedata.unidata_version, regex.__version__, ftfy.__version__))
    emit('#include "model/tokenizer_tables.h"')
    emit()
    for k, v in P.items():
        emit("_Static_assert(UP_%s == 0x%04x, \"property bit\");" % (k, v))
    emit()
    nb = two_level("uni_props", "uint16_t", props, 7)
    emit()
    nb2 = two_level("uni_ccc", "uint8_t", ccc, 7)
    emit()

    # lower-case: sorted code points, each with up to 3 code points (0-padded)
    keys = sorted(lower)
    c_array("uint32_t", "uni_lower_cp", keys, 10, "0x{:x}")
    vals = []
    for k in keys:
        s = [ord(x) for x in lower[k]] + [0, 0]
        vals.append("{0x%x, 0x%x, 0x%x}" % tuple(s[:3]))
    emit("const uint32_t uni_lower_map[%d][3] = {" % len(keys))
    for i in range(0, len(vals), 4):
        emit("    " + ", ".join(vals[i:i + 4]) + ",")
    emit("};")
    emit("const size_t uni_lower_count = %d;" % len(keys))
    emit()

    # canonical decomposition, full (recursive), without Hangul syllables
    keys = sorted(decomp)
    c_array("uint32_t", "uni_decomp_cp", keys, 10, "0x{:x}")
    vals = []
    for k in keys:
        s = decomp[k] + [0, 0, 0]
        vals.append("{0x%x, 0x%x, 0x%x, 0x%x}" % tuple(s[:4]))
    emit("const uint32_t uni_decomp_map[%d][4] = {" % len(keys))
    for i in range(0, len(vals), 3):
        emit("    " + ", ".join(vals[i:i + 3]) + ",")
    emit("};")
    emit("const size_t uni_decomp_count = %d;" % len(keys))
    emit()

    # primary composites: key (first << 21 | second), sorted
    pairs = sorted(((a << 21) | b, c) for (a, b), c in comp.items())
    c_array("uint64_t", "uni_comp_key", [p[0] for p in pairs], 6, "0x{:x}ull")
    c_array("uint32_t", "uni_comp_val", [p[1] for p in pairs], 10, "0x{:x}")
    emit("const size_t uni_comp_count = %d;" % len(pairs))
    emit()

    # ------------------------------------------------------------------ ftfy char classes
    cats = badness.MOJIBAKE_CATEGORIES
    M = dict(c1=1 << 0, bad=1 << 1, currency=1 << 2, start_punctuation=1 << 3,
             end_punctuation=1 << 4, numeric=1 << 5, kaomoji=1 << 6, upper_accented=1 << 7,
             lower_accented=1 << 8, upper_common=1 << 9, lower_common=1 << 10, box=1 << 11,
             common=1 << 12)
    U = dict(utf8_first_of_2=1 << 13, utf8_first_of_3=1 << 14, utf8_first_of_4=1 << 15,
             utf8_continuation=1 << 16, utf8_continuation_strict=1 << 17)
    assert set(M) == set(cats), sorted(cats)
    assert set(U) == set(chardata.UTF8_CLUES)
    masks = {}
    for table, bits in ((cats, M), (chardata.UTF8_CLUES, U)):
        for name, chars in table.items():
            pat = re.compile("[" + chars + "]")
            for cp in range(0x10000):
                if cp in SURR:
                    continue
                if pat.fullmatch(chr(cp)):
                    masks[cp] = masks.get(cp, 0) | bits[name]
    keys = sorted(masks)
    emit("/* ftfy 6.1.1 badness.MOJIBAKE_CATEGORIES and chardata.UTF8_CLUES as bits (MJ_*). */")
    c_array("uint32_t", "ftfy_class_cp", keys, 10, "0x{:x}")
    c_array("uint32_t", "ftfy_class_mask", [masks[k] for k in keys], 10, "0x{:x}")
    emit("const size_t ftfy_class_count = %d;" % len(keys))
    for k, v in list(M.items()) + list(U.items()):
        emit("_Static_assert(MJ_%s == 0x%x, \"ftfy class bit\");" % (k.upper(), v))
    emit()

    # ------------------------------------------------------------------ single-byte codecs
    encs = chardata.CHARMAP_ENCODINGS
    emit("/* ftfy chardata.CHARMAP_ENCODINGS, in the order ftfy tries them: %s */" % ", ".join(encs))
    emit("const uint16_t ftfy_codec_decode[%d][256] = {" % len(encs))
    enc_lists = []
    for e in encs:
        dec = bytes(range(256)).decode(e)
        assert all(ord(ch) < 0x10000 for ch in dec)
        emit("    { /* %s */" % e)
        vals = [ord(ch) for ch in dec]
        for i in range(0, 256, 16):
            emit("        " + ", ".join("0x%04x" % v for v in vals[i:i + 16]) + ",")
        emit("    },")
        # what chardata.possible_encoding accepts beyond ASCII-minus-0x1A, and how
        # str.encode(e) writes it
        charlist = (bytes(list(range(0x80, 0x100)) + [0x1A])).decode(e)
        enc = {}
        for ch in set(charlist):
            bb = ch.encode(e)
            assert len(bb) == 1
            enc[ord(ch)] = bb[0]
        # ASCII except 0x1A must be the identity in every codec
        for cp in list(range(0, 0x1A)) + list(range(0x1B, 0x80)):
            assert chr(cp).encode(e) == bytes([cp]), (e, cp)
        enc_lists.append(sorted(enc.items()))
    emit("};")
    off = 0
    offs = []
    flat_cp, flat_b = [], []
    for lst in enc_lists:
        offs.append(off)
        for cp, b in lst:
            flat_cp.append(cp)
            flat_b.append(b)
        off += len(lst)
    offs.append(off)
    c_array("uint16_t", "ftfy_codec_enc_cp", flat_cp, 12, "0x{:04x}")
    c_array("uint8_t", "ftfy_codec_enc_byte", flat_b, 16, "0x{:02x}")
    c_array("uint16_t", "ftfy_codec_enc_off", offs, 10)
    emit()

    # ------------------------------------------------------------------ HTML entities
    ents = sorted((k[1:-1], v) for k, v in chardata.HTML_ENTITIES.items())
    assert all(k.startswith("&") and k.endswith(";") for k in chardata.HTML_ENTITIES)
    # names longer than 24 characters can never match HTML_ENTITY_RE
    ents = [(k, v) for k, v in ents if re.fullmatch(r"[0-9A-Za-z]{1,24}", k)]
    assert max(len(v) for _, v in ents) <= 3
    emit("/* ftfy chardata.HTML_ENTITIES (html5 names ending in ';', plus the all-caps forms ftfy")
    emit(" * accepts), without '&' and ';', sorted bytewise. Values: up to 3 code points. */")
    emit("const struct ftfy_entity ftfy_entities[%d] = {" % len(ents))
    for k, v in ents:
        s = [ord(x) for x in v] + [0, 0]
        emit('    {"%s", {0x%x, 0x%x, 0x%x}},' % (k, s[0], s[1], s[2]))
    emit("};")
    emit("const size_t ftfy_entity_count = %d;" % len(ents))
    emit()
    # html.unescape's numeric character references: the remapped numbers (_invalid_charrefs)
    inv = sorted(html._invalid_charrefs.items())
    assert all(len(v) == 1 for _, v in inv)
    c_array("uint32_t", "html_charref_num", [k for k, _ in inv], 10, "0x{:x}")
    c_array("uint32_t", "html_charref_val", [ord(v) for _, v in inv], 10, "0x{:x}")
    emit("const size_t html_charref_count = %d;" % len(inv))
    # _invalid_codepoints must be what text_fix.c tests by formula
    formula = set(range(0x1, 0x9)) | set(range(0xE, 0x20)) | set(range(0x7F, 0xA0)) | \
        set(range(0xFDD0, 0xFDF0)) | {0xB} | {p * 0x10000 + 0xFFFE for p in range(17)} | \
        {p * 0x10000 + 0xFFFF for p in range(17)}
    assert set(html._invalid_codepoints) == formula
    emit()

    # ------------------------------------------------------------------ ligatures, widths
    lig = sorted(chardata.LIGATURES.items())
    assert all(len(v) <= 3 for _, v in lig)
    emit("/* ftfy chardata.LIGATURES and WIDTH_MAP: code point -> up to 3 code points. */")
    emit("const struct ftfy_map ftfy_ligatures[%d] = {" % len(lig))
    for k, v in lig:
        s = [ord(x) for x in v] + [0, 0]
        emit("    {0x%x, {0x%x, 0x%x, 0x%x}}," % (k, s[0], s[1], s[2]))
    emit("};")
    emit("const size_t ftfy_ligature_count = %d;" % len(lig))
    wid = sorted(chardata.WIDTH_MAP.items())
    assert all(len(v) <= 3 for _, v in wid)
    emit("const struct ftfy_map ftfy_widths[%d] = {" % len(wid))
    for k, v in wid:
        s = [ord(x) for x in v] + [0, 0]
        emit("    {0x%x, {0x%x, 0x%x, 0x%x}}," % (k, s[0], s[1], s[2]))
    emit("};")
    emit("const size_t ftfy_width_count = %d;" % len(wid))
    emit()

    # control characters ftfy removes, and quote classes: checked against the formulas in C
    assert set(chardata.CONTROL_CHARS) == set(range(0, 9)) | {0xB} | set(range(0xE, 0x20)) | {0x7F} | \
        set(range(0x206A, 0x2070)) | {0xFEFF} | set(range(0xFFF9, 0xFFFD))
    assert chardata.SINGLE_QUOTE_RE.pattern == "[\u02bc\u2018-\u201b]"
    assert chardata.DOUBLE_QUOTE_RE.pattern == "[\u201c-\u201f]"

    # ------------------------------------------------------------------ split-pattern literals
    emit("/* Letters the split pattern's literals (<|startoftext|>, 's, 'll, ...) accept under")
    emit(" * IGNORECASE besides themselves, lower-case ASCII letter -> up to 3 more code points. */")
    emit("const uint32_t tok_letter_equiv[26][3] = {")
    for i in range(26):
        ch = chr(ord("a") + i)
        eq = [cp for cp in range(MAX_CP) if cp not in SURR and cp != ord(ch)
              and regex.fullmatch(regex.escape(ch), chr(cp), regex.IGNORECASE)]
        assert len(eq) <= 3, (ch, eq)
        eq += [0] * (3 - len(eq))
        emit("    {0x%x, 0x%x, 0x%x}, /* %s */" % (eq[0], eq[1], eq[2], ch))
    emit("};")

    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out_lines) + "\n")
    print("%s: %d prop blocks, %d ccc blocks, %d lower, %d decomp, %d comp, %d ftfy classes, %d entities"
          % (path, nb, nb2, len(lower), len(decomp), len(comp), len(masks), len(ents)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tokenizer_tables.c")
