"""Build step: turns OpenAI CLIP's BPE merge list (lib/model/clip/bpe_simple_vocab_16e6.txt.gz,
MIT, see lib/model/clip/LICENSE) into C source holding the merges as pairs of token ids.

    python3 gen_bpe_table.py bpe_simple_vocab_16e6.txt.gz out.c

The vocabulary is the one openai/CLIP's SimpleTokenizer and transformers' CLIPTokenizer
(vocab.json) define: the 256 byte symbols of bytes_to_unicode in its order (ids 0-255), the
same followed by "</w>" (256-511), one token per merge in merge order (512 + rank), then
<|startoftext|> (49406) and <|endoftext|> (49407). transformers reads merges.txt lines
1 .. 49152-256-2 (48894 merges). Because merge k creates token 512 + k, a merge is fully
described by the ids of its two parts, which is all the C tokenizer needs: no strings are
stored. Standard library only (runs with any Python 3 meson finds).
"""
import gzip
import sys

N_MERGES = 49152 - 256 - 2


def byte_symbols():
    """bytes_to_unicode: printable Latin-1 bytes map to themselves, the rest to 256 + n."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    order = keep[:]
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            order.append(b)
            chars.append(256 + n)
            n += 1
    return order, [chr(c) for c in chars]


def main(src, dst):
    text = gzip.open(src).read().decode("utf-8")
    lines = text.split("\n")
    if "#version" not in lines[0]:
        sys.exit("%s: unexpected first line %r" % (src, lines[0]))
    merges = [tuple(m.split()) for m in lines[1:N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        sys.exit("%s: expected %d two-part merges" % (src, N_MERGES))
    _, syms = byte_symbols()
    vocab = syms + [s + "</w>" for s in syms]
    ids = {s: i for i, s in enumerate(vocab)}
    pairs = []
    for k, (a, b) in enumerate(merges):
        if a not in ids or b not in ids:
            sys.exit("merge %d (%s %s): a part is not an earlier token" % (k, a, b))
        tok = a + b
        if tok in ids:
            sys.exit("merge %d (%s %s) repeats token %r" % (k, a, b, tok))
        ids[tok] = 512 + k
        pairs.append((ids[a], ids[b]))
    if len(set(pairs)) != len(pairs):
        sys.exit("a merge pair appears twice")
    assert len(ids) + 2 == 49408
    out = ["/* Generated at build time by lib/model/gen_bpe_table.py from",
           " * bpe_simple_vocab_16e6.txt.gz (OpenAI CLIP, MIT): merge k = {left id, right id},",
           " * creating token 512 + k. */",
           "#include <stdint.h>",
           "",
           "extern const uint16_t clip_bpe_merges[%d][2];" % N_MERGES,
           "const uint16_t clip_bpe_merges[%d][2] = {" % N_MERGES]
    for i in range(0, N_MERGES, 8):
        out.append("    " + " ".join("{%d,%d}," % p for p in pairs[i:i + 8]))
    out.append("};")
    with open(dst, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
