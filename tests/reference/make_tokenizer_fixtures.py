"""Writes tests/data/tokenizer/reference_ids.json: token ids of transformers 4.25.1's slow
CLIPTokenizer (with ftfy 6.1.1 installed, so CLIPTokenizer uses ftfy.fix_text) for a set of
prompts, in the forms kohya's sd-scripts feeds them to the text encoder. Used by
tests/unit/test_tokenizer.c; every expected id comes from transformers here, none from liblora.

    tests/reference/.venv/bin/python tests/reference/make_tokenizer_fixtures.py

There is no hub access, so the two tokenizers kohya loads are rebuilt from OpenAI's merge list
(lib/model/clip/bpe_simple_vocab_16e6.txt.gz, the file vendored into liblora):
  * vocab.json / merges.txt as openai/CLIP's SimpleTokenizer and transformers define them (256
    byte symbols, the same + "</w>", one token per merge for the first 48894 merges,
    <|startoftext|>, <|endoftext|>: 49408 ids); checked against ids known from the hub
    tokenizer ("a photo of a cat" -> 49406 320 1125 539 320 2368 49407);
  * v1 = openai/clip-vit-large-patch14: bos/eos/unk AddedTokens (no lstrip/rstrip), pad_token
    "<|endoftext|>" (= EOS, 49407), model_max_length 77;
  * v2 = stabilityai/stable-diffusion-2 subfolder "tokenizer": the same, but the
    special_tokens_map.json pad_token is "!" (id 0). A special token makes "!" a no-split
    token: every "!" in a caption becomes id 0 and strips the white space beside it.
kohya's train_util.get_input_ids (commit f0ae7eea, Feb 2023) is reproduced below from the spec
(§4.5): max_token_length None (75 here) -> one padded/truncated sequence of 77; 150/225 ->
BOS + 150/225 + EOS split into chunks of 77, with the v2 (pad != eos) fix-ups.
"""
import gzip
import json
import os
import sys
import tempfile

import ftfy
import regex
import tokenizers  # noqa: F401  (version report only)
import torch
import transformers
from transformers import CLIPTokenizer

transformers.logging.set_verbosity_error()   # "sequence length is longer than ..." is expected

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
BPE = os.path.join(ROOT, "lib", "model", "clip", "bpe_simple_vocab_16e6.txt.gz")
OUT = os.path.join(ROOT, "tests", "data", "tokenizer", "reference_ids.json")
N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode():
    # the mapping transformers.models.clip.tokenization_clip defines; its own function is used
    from transformers.models.clip.tokenization_clip import bytes_to_unicode
    return bytes_to_unicode()


def write_tokenizer_dir(d, pad_token):
    lines = gzip.open(BPE).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:N_MERGES + 1]]
    syms = list(_bytes_to_unicode().values())
    vocab = syms + [s + "</w>" for s in syms] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    enc = {t: i for i, t in enumerate(vocab)}
    assert len(enc) == 49408
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(enc, f, ensure_ascii=False)
    with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")

    def added(c):
        return {"content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True}

    with open(os.path.join(d, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"),
                   "unk_token": added("<|endoftext|>"), "pad_token": pad_token}, f)
    cfg = {"unk_token": dict(added("<|endoftext|>"), __type="AddedToken"),
           "bos_token": dict(added("<|startoftext|>"), __type="AddedToken"),
           "eos_token": dict(added("<|endoftext|>"), __type="AddedToken"),
           "pad_token": "<|endoftext|>", "add_prefix_space": False, "errors": "replace", "do_lower_case": True,
           "model_max_length": 77, "special_tokens_map_file": "./special_tokens_map.json",
           "tokenizer_class": "CLIPTokenizer"}
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)


def reference_tokenizers():
    """{"v1": CLIPTokenizer, "v2": CLIPTokenizer} rebuilt as the module docstring says."""
    tmp = tempfile.mkdtemp(prefix="clip_tok_")
    out = {}
    for name, pad in (("v1", "<|endoftext|>"), ("v2", "!")):
        d = os.path.join(tmp, name)
        write_tokenizer_dir(d, pad)
        tok = CLIPTokenizer.from_pretrained(d)
        assert tok.fix_text is ftfy.fix_text, "ftfy must be installed: CLIPTokenizer falls back to BasicTokenizer"
        assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert tok.eos_token_id == 49407 and tok.bos_token_id == 49406 and tok.model_max_length == 77
        out[name] = tok
    assert out["v1"].pad_token_id == 49407 and out["v2"].pad_token_id == 0
    return out


def kohya_input_ids(tokenizer, caption, max_token_length):
    """train_util.BaseDataset.get_input_ids (FEB), max_token_length None | 150 | 225."""
    model_max = tokenizer.model_max_length
    max_len = model_max if max_token_length is None else max_token_length + 2
    ids = tokenizer(caption, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt").input_ids
    if max_len <= model_max:
        return ids[0].tolist()
    ids = ids.squeeze(0)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for i in range(1, max_len - model_max + 2, model_max - 2):
        chunk = torch.cat((ids[0].unsqueeze(0), ids[i:i + model_max - 2], ids[-1].unsqueeze(0)))
        if pad != eos:
            if chunk[-2] != eos and chunk[-2] != pad:
                chunk[-1] = eos
            if chunk[1] == pad:
                chunk[1] = eos
        chunks.append(chunk)
    return torch.stack(chunks).reshape(-1).tolist()


TAGS = ("masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile, blue eyes, blonde hair, "
        "dress, holding, standing, outdoors, sky, day, cloud, tree, blue sky, white dress, grass, flower, "
        "wind, field, sunlight, scenery, hat, sun hat, straw hat, floating hair, petals, cherry blossoms, "
        "depth of field, bokeh, lens flare, detailed background, cinematic lighting, highly detailed, "
        "sharp focus, intricate, elegant, digital painting, artstation, concept art, smooth, illustration, "
        "art by greg rutkowski and alphonse mucha, 8k, uhd, dslr, soft lighting, high quality, film grain, "
        "fujifilm xt3, ray tracing, volumetric fog, god rays, golden hour, rim light, backlighting, "
        "from below, dutch angle, dynamic pose, wavy hair, hair ribbon, earrings, necklace, bracelet, "
        "frills, lace, ribbon, bow, sleeveless, bare shoulders, collarbone, medium breasts, arms up, "
        "outstretched arm, hand on own chest, open mouth, blush, happy, teeth, upper body, cowboy shot, "
        "full body, wide shot, landscape, mountain, river, lake, reflection, water, ocean, beach, sand")


def prompt_with_tokens(tok, n, tail=""):
    """A tag list cut to exactly n raw tokens (counted by the reference): the longest prefix of
    TAGS within n tokens, then one-token words ("red") up to n, then `tail`."""
    def count(t):
        return len(tok(t, add_special_tokens=False).input_ids)
    words = TAGS.split(" ")
    k = 1
    while k < len(words) and count(" ".join(words[:k + 1])) <= n:
        k += 1
    text = " ".join(words[:k])
    while count(text) < n:
        text += " red"
    text += tail
    assert count(text[:len(text) - len(tail)]) == n
    return text


def cases(refs):
    v1 = refs["v1"]
    c = [
        ("empty", ""),
        ("spaces_only", "   \t \n  "),
        ("simple", "a photo of a cat"),
        ("upper_case", "A PHOTO OF A Cat In THE Hat"),
        ("contractions", "it's what you'll see, I'm sure we've done it, they'd say don't"),
        ("contractions_upper", "IT'S WE'LL I'M YOU'RE THEY'VE HE'D DON'T"),
        ("numbers", "2girls, 1boy, 4k 8k 1024x768, 3.14159, 2023-02-23, 100%"),
        ("weights", "(masterpiece:1.2), ((best quality)), [[lowres]], (worst quality:0.8), {extra}"),
        ("alternation", "[cat|dog] in a [red|blue|green] room, [from:to:0.5]"),
        ("lora_syntax", "1girl, <lora:my_character_v2:0.5>, <hypernet:anime:1>, <lyco:style-01:0.7>"),
        ("break_keyword", "a castle BREAK a dragon, AND a knight"),
        ("escaped_parens", r"\(artist\), \[text\], back\\slash"),
        ("cjk_chinese", "一个女孩，长发，蓝眼睛，微笑，高质量"),
        ("cjk_japanese", "女の子、ロングヘア、青い目、笑顔、ｶﾀｶﾅ 半角"),
        ("cjk_korean", "소녀, 긴 머리, 파란 눈, 미소"),
        ("emoji", "cute cat 😺🐱 with hearts ❤️💕 and a flag 🇯🇵 and family 👨‍👩‍👧"),
        ("rtl_arabic", "فتاة جميلة في الحديقة مع الزهور"),
        ("rtl_hebrew_mixed", "\u05e9\u05dc\u05d5\u05dd world \u202eevil\u202c text"),
        ("mojibake_latin1", "cafÃ© au lait, naÃ¯ve rÃ©sumÃ©, Ã¼ber"),
        ("mojibake_cp1252_quotes", "â€œsmart quotesâ€\u009d and itâ€™s aâ€¦ test â€” dash"),
        ("mojibake_double", "ÃƒÂ© and ÃƒÂ¼ber"),
        ("mojibake_a_grave", "Ã la mode, voilÃ  le travail"),
        ("mojibake_cyrillic", "Ð¿Ñ€Ð¸Ð²ÐµÑ‚ Ð¼Ð¸Ñ€"),
        ("mojibake_emoji", "I â™¥ NY, ðŸ˜€ smile"),
        ("mojibake_mixed", "cafÃ© and café side by side"),
        ("mojibake_cesu8", "emoji \u00ed\u00a0\u00bd\u00ed\u00b8\u0080 in CESU-8, Java null \u00c3\u0080 x"),
        ("mojibake_lossy", "\u00e2\u20ac\u0153 like this \u00e2\u20ac\ufffd and caf\u00c3? ok"),
        ("mojibake_macroman", "caf\u221a\u00a9 cr\u221a\u00ae\u221a\u00a8me"),
        ("mojibake_1251", "\u0432\u0402\u045a\u0420\u0459\u0432\u0402\u045c quotes \u0420\u0454\u0420\u00b0"),
        ("html_lt_next_line", "&amp; first\n<b> &amp; second\n&amp; third &eacute;"),
        ("c1_controls", "price \x80100 \x93quoted\x94 \x85 end"),
        ("html_entities", "Fish &amp; Chips &lt;3 caf&eacute; &#233;t&#xE9; &hellip; &nbsp;x &copy; &NTILDE;"),
        ("html_entities_with_lt", "<b>&amp;</b> &lt;tag&gt; stays"),
        ("html_numeric_edge", "&#59; &#0; &#128; &#x1F600; &#99999999; &#xD800; &#1;x &#12a; &amp"),
        ("curly_quotes", "\u201cHello,\u201d she said, \u2018it\u2019s fine\u2019 \u201etest\u201f \u02bcx"),
        ("ligatures", "\ufb01ne \ufb02ower, of\ufb01ce \ufb00 \ufb03 \ufb04 \ufb05 \ufb06 \u0132 \u01c6"),
        ("full_width", "\uff2c\uff2f\uff35\uff24\u3000\uff2e\uff2f\uff29\uff33\uff25\uff33\uff01 \uff11\uff12\uff13 "
                       "\uff08masterpiece\uff1a1.2\uff09"),
        ("nbsp_zero_width", "a\u00a0photo\u2007of\u202fa\u200bcat\u200c\u200d\u2060 \ufeffdog\u00ad"),
        ("control_chars", "line1\r\nline2\rline3\x0bvt\x0cff\x1b[31mred\x1b[0m\x07bell\x7fdel\u2028ls\u2029ps"),
        ("endoftext_inside", "a cat<|endoftext|>a dog <|startoftext|> bird <|ENDOFTEXT|> fish!!<|endoftext|>"),
        ("word_300_chars", "supercalifragilistic" * 15),
        ("bang_v2", "!!!"),
        ("bang_in_text", "wow! amazing!! so good !!! yes!? ! end"),
        ("accents_nfd", "cafe\u0301 na\u0131\u0308ve Ame\u0301lie a\u0308\u0301 \u1100\u1161\u11a8"),
        ("greek_sigma", "ΟΔΥΣΣΕΥΣ ΣΑΣ Σ. ΑΣ! σοφία"),
        ("turkish_dotted", "İSTANBUL ıi KELVIN \u212a \u00c5ngstr\u00f6m \u212b 'ſ"),
        ("tabs_newlines", "portrait,\n\tdetailed face,\n\n  soft light\t\t"),
        ("punct_runs", "...!!!???---___***///\\\\|||~~~```"),
        ("tag_list_200", TAGS),
        ("tag_list_300", TAGS + ", " + TAGS),
        ("exactly_75", prompt_with_tokens(v1, 75)),
        ("exactly_76", prompt_with_tokens(v1, 76)),
        ("exactly_150", prompt_with_tokens(v1, 150)),
        ("exactly_151", prompt_with_tokens(v1, 151)),
        ("exactly_225", prompt_with_tokens(v1, 225)),
        ("exactly_226", prompt_with_tokens(v1, 226)),
        ("bang_at_75", prompt_with_tokens(v1, 74) + "!"),
        ("bang_at_150", prompt_with_tokens(v1, 149) + "!"),
    ]
    return c


def main():
    refs = reference_tokenizers()
    out = {"generator": "tests/reference/make_tokenizer_fixtures.py",
           "versions": {"transformers": transformers.__version__, "ftfy": ftfy.__version__,
                        "regex": regex.__version__, "python": sys.version.split()[0]},
           "cases": []}
    names = set()
    for name, text in cases(refs):
        assert name not in names
        names.add(name)
        entry = {"name": name, "text": text}
        for flavour, tok in refs.items():
            raw = tok(text, add_special_tokens=False).input_ids
            e = {"raw": raw}
            for mtl in (None, 150, 225):
                e[str(mtl or 75)] = kohya_input_ids(tok, text, mtl)
            entry[flavour] = e
        out["cases"].append(entry)
    lens = {c["name"]: len(c["v1"]["raw"]) for c in out["cases"]}
    assert lens["exactly_75"] == 75 and lens["exactly_76"] == 76 and lens["tag_list_200"] >= 200, lens
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True, ensure_ascii=True)
        f.write("\n")
    print("%s: %d cases; raw token counts (v1): %s" % (OUT, len(out["cases"]), lens))


if __name__ == "__main__":
    main()
