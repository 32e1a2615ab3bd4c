#!/usr/bin/env python3
"""Reference data for lib/gen/prompt.c and prompt_line.c from kohya's own gen_img_diffusers.py
(sd-scripts commit 75d1883, unpacked at /tmp/kohya-full or $KOHYA_DIR):

    tests/reference/.venv/bin/python tests/reference/make_prompt_fixtures.py

The script imports gen_img_diffusers.py itself (its heavy imports that these functions do not
use - torchvision, einops, library.*, tools.* - are stubbed) and calls its functions; nothing of
kohya is copied here.

* tests/data/prompt/parse.json: parse_prompt_attention(text) for a list of prompts
  (tests/unit/test_prompt_parse.c).
* tests/data/prompt/weighting_v1.safetensors, weighting_v2.safetensors: for each case,
  get_weighted_text_embeddings(pipe, prompt, negative, max_embeddings_multiples, clip_skip)
  as kohya's pipeline calls it (no_boseos_middle False) on the tiny v1/v2 text encoders
  (tests/data/sd/vN_diffusers/text_encoder) with the 49408-row formula token embedding of
  make_encode_prompt_reference.py; recorded: the padded ids and weights
  (pad_tokens_and_weights), the 77-id chunks sent to the encoder, and cond/uncond. The case list
  (JSON) is in the metadata. (tests/parity/test_prompt_weighting.c)
* tests/data/prompt/lines.json: what kohya's main loop makes of --from_file lines: the loop's
  own statements (from "width = args.W" to the "for parg in prompt_args[1:]" loop) are taken
  from main()'s syntax tree and run on each line; and the file reading statements
  (splitlines, blank-line filter) on a whole file (tests/unit/test_prompt_line.c).

BREAK: kohya at this commit has no BREAK. For the BREAK cases the token list is built with
A1111's rule (modules/prompt_parser.py re_break, sd_hijack_clip.tokenize_line next_chunk),
written out below: each BREAK-separated segment goes through kohya's get_prompts_with_weights;
a BREAK closes the current 75-token chunk, filled with EOS then padding (A1111's id_end fill,
of which process_tokens keeps the first and turns the rest into id_pad on v2); an empty chunk
closed by a BREAK is a whole chunk of fill. The list then goes through kohya's own padding,
chunking, encoding and weighting (get_weighted_text_embeddings with get_prompts_with_weights
swapped for this one).
"""
import ast
import io
import json
import os
import re
import sys
import tempfile
import types
import importlib.util
from contextlib import redirect_stdout
from unittest import mock

import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_tokenizer_fixtures import reference_tokenizers  # noqa: E402
from make_encode_prompt_reference import formula_embedding, VOCAB  # noqa: E402

KOHYA = os.environ.get("KOHYA_DIR", "/tmp/kohya-full")
SD = os.path.normpath(os.path.join(HERE, "..", "data", "sd"))
OUT = os.path.normpath(os.path.join(HERE, "..", "data", "prompt"))


def import_kohya_gen():
    for name in ("torchvision", "torchvision.transforms", "einops", "library", "library.model_util",
                 "library.train_util", "tools", "tools.original_control_net"):
        sys.modules[name] = mock.MagicMock(name=name)
    spec = importlib.util.spec_from_file_location("kohya_gen_img", os.path.join(KOHYA, "gen_img_diffusers.py"))
    g = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(g)
    return g


G = import_kohya_gen()

PARSE_PROMPTS = [
    "normal text",
    "an (important) word",
    "(unbalanced",
    "\\(literal\\]",
    "(unnecessary)(parens)",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "",
    "   ",
    "\\",
    "a \\ b",
    "\\\\(x)",
    "(",
    ")",
    "[]",
    "()",
    "unmatched) and ] and : colon",
    "(:1.2)",
    ":1.5)",
    "a:b",
    "(a:b)",
    "(a:-0.5)",
    "(a:+2)",
    "(a:.5)",
    "(a:5.)",
    "(a:007.250)",
    "((a:2):3)",
    "[a:1.2]",
    "(a [b) c]",
    "[[[tiny]]] [[small]] [x]",
    "((((((deep))))))",
    "[(mixed)] ([mixed2])",
    "(a:1.2) (b:1.2) same weights merge",
    "(a)(b)[c][d]",
    "café (日本語:1.2), ümlaut [ß]",
    "escaped \\[not weak\\] and \\(not strong\\) (but this)",
    "trailing backslash\\",
    "(x:1.1)(y)",
    "masterpiece, best quality, (1girl:1.3), [blurry], ((detailed eyes)), (smile:0.8)",
    "a (b (c (d:1.5) e) f) g",
    "a [b [c (d) e] f] g",
    "(a:1.2:3)",
    "(a:1.2 )",
]

# (name, version, prompt, negative (None: no CFG), max_embeddings_multiples, clip_skip)
def weighting_cases(tag_text):
    long150 = tag_text(150)
    long240 = tag_text(240)
    long90 = tag_text(90)
    return [
        ("v1_plain", "v1", "a photo of a cat", "", 1, 1),
        ("v1_emphasis", "v1", "a (red:1.3) car, (shiny) [dull] wheels, ((very)) [[faint]] (big:0.5)",
         "blurry, (low quality:1.4)", 1, 1),
        ("v1_nested_escapes_skip2", "v1",
         "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))). \\(literal\\) \\[x\\] (a:b) (unclosed [open",
         "(lowres", 1, 2),
        ("v1_small_weights", "v1", "(ghost:0.2), (anti:-0.5) thing, [[[tiny]]]", "(worst:0.1)", 1, 1),
        ("v1_long_neg_longer", "v1", "a cat", "(" + long90 + ":1.1)", 3, 1),
        ("v1_truncate225", "v1", "(" + long240 + ")", "", 3, 2),
        ("v1_break", "v1", "a cat BREAK (a dog:1.2) BREAK sky", "bad BREAK", 3, 1),
        ("v1_nocfg", "v1", "(cat:1.2), dog", None, 3, 1),
        ("v2_emphasis_skip2", "v2", "a (photo:1.2) of an [astronaut] riding a ((horse)) on mars!!!", "ugly!", 1, 2),
        ("v2_long150", "v2", long150.replace(", ", ", (", 3).replace(",", ":1.3),", 1) + "!!! wow", "", 3, 1),
        ("v2_truncate75", "v2", long90, "(blurry:1.2)", 1, 1),
        ("v2_break", "v2", "start BREAK BREAK (x:0.8) end", "BREAK neg BREAK", 3, 1),
    ]


class Pipe:
    """The attributes of kohya's PipelineLike that get_weighted_text_embeddings uses."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = torch.device("cpu")

    def replace_token(self, tokens):   # no textual inversion
        return tokens


class RecordingEncoder:
    def __init__(self, model):
        self.model = model
        self.text_model = model.text_model
        self.calls = []

    def __call__(self, ids, **kw):
        self.calls.append(ids.clone())
        return self.model(ids, **kw)


RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)   # A1111 modules/prompt_parser.py


def tokens_with_break(pipe, prompts, max_length):
    """get_prompts_with_weights with A1111's BREAK (see the module docstring)."""
    eos, pad = pipe.tokenizer.eos_token_id, pipe.tokenizer.pad_token_id
    all_t, all_w = [], []
    for text in prompts:
        chunks, cur = [], []
        segs = RE_BREAK.split(text)
        for i, seg in enumerate(segs):
            if i > 0:   # next_chunk(): fill the current chunk, start a new one
                add = 75 - len(cur)
                cur += [(eos, 1.0)] + [(pad, 1.0)] * (add - 1) if add > 0 else []
                chunks.append(cur)
                cur = []
            t, w = ORIG_GET_PROMPTS(pipe, [seg], 10 ** 6)
            for tok, wt in zip(t[0], w[0]):
                if len(cur) == 75:
                    chunks.append(cur)
                    cur = []
                cur.append((tok, wt))
        if cur:
            chunks.append(cur)
        flat = [x for c in chunks for x in c][:max_length]
        all_t.append([x[0] for x in flat])
        all_w.append([x[1] for x in flat])
    return all_t, all_w


ORIG_GET_PROMPTS = G.get_prompts_with_weights
ORIG_PAD = G.pad_tokens_and_weights
ORIG_UNWEIGHTED = G.get_unweighted_text_embeddings


def run_case(pipe, prompt, negative, mem, clip_skip):
    padded = []

    def pad_rec(tokens, weights, *a, **kw):
        t, w = ORIG_PAD(tokens, weights, *a, **kw)
        padded.append(([list(x) for x in t], [list(x) for x in w]))
        return t, w

    raw = []

    def unweighted_rec(*a, **kw):
        e = ORIG_UNWEIGHTED(*a, **kw)
        raw.append(e.clone())
        return e

    G.pad_tokens_and_weights = pad_rec
    G.get_unweighted_text_embeddings = unweighted_rec
    use_break = "BREAK" in prompt or (negative is not None and "BREAK" in negative)
    G.get_prompts_with_weights = tokens_with_break if use_break else ORIG_GET_PROMPTS
    pipe.text_encoder.calls = []
    try:
        with torch.no_grad():
            cond, uncond, _ = G.get_weighted_text_embeddings(pipe, prompt, negative, max_embeddings_multiples=mem,
                                                             clip_skip=clip_skip)
    finally:
        G.pad_tokens_and_weights = ORIG_PAD
        G.get_prompts_with_weights = ORIG_GET_PROMPTS
        G.get_unweighted_text_embeddings = ORIG_UNWEIGHTED
    # Conditioning of kohya's mean re-normalisation E *= mean(E) / mean(w E): a relative error
    # e in the encoder output moves the ratio by up to about e * kappa, kappa = mean|E| / |mean E|
    # + mean|w E| / |mean w E| (large when the means nearly cancel). The C test scales its
    # tolerance by it.
    kappa = []
    for e, (_, w) in zip(raw, padded):
        we = e.double() * torch.tensor(w[0], dtype=torch.float64).reshape(1, -1, 1)
        e = e.double()
        kappa.append(float(e.abs().mean() / e.mean().abs() + we.abs().mean() / we.mean().abs()))
    return cond, uncond, padded, pipe.text_encoder.calls, kappa


def make_weighting(toks):
    def tag_text(n):
        # comma separated one-token words "tagK" -> count tokens with the reference tokenizer
        words, k = [], 0
        while True:
            cand = ", ".join(words + ["red"])
            if len(toks["v1"](cand, add_special_tokens=False).input_ids) > n:
                break
            words.append(["red", "blue", "green", "cat", "dog", "sky"][k % 6])
            k += 1
        return ", ".join(words)

    pipes = {}
    for v in ("v1", "v2"):
        m = CLIPTextModel.from_pretrained(os.path.join(SD, v + "_diffusers", "text_encoder")).float().eval()
        emb = torch.nn.Embedding(VOCAB, m.config.hidden_size)
        emb.weight.data = formula_embedding(m.config.hidden_size)
        m.text_model.embeddings.token_embedding = emb
        m.config.vocab_size = VOCAB
        pipes[v] = Pipe(toks[v], RecordingEncoder(m))
    files = {"v1": ({}, []), "v2": ({}, [])}
    for name, v, prompt, negative, mem, skip in weighting_cases(tag_text):
        cond, uncond, padded, calls, kappa = run_case(pipes[v], prompt, negative, mem, skip)
        out, meta = files[v]
        out[name + ".cond"] = cond[0].contiguous()
        out[name + ".ids"] = torch.tensor(padded[0][0][0], dtype=torch.int32)
        out[name + ".weights"] = torch.tensor(padded[0][1][0], dtype=torch.float32)
        out[name + ".chunks"] = torch.cat([c.reshape(-1) for c in calls[:len(calls) // (2 if uncond is not None else 1)]]).to(torch.int32)
        if uncond is not None:
            out[name + ".uncond"] = uncond[0].contiguous()
            out[name + ".neg_ids"] = torch.tensor(padded[1][0][0], dtype=torch.int32)
            out[name + ".neg_weights"] = torch.tensor(padded[1][1][0], dtype=torch.float32)
            out[name + ".neg_chunks"] = torch.cat([c.reshape(-1) for c in calls[len(calls) // 2:]]).to(torch.int32)
        meta.append({"name": name, "version": v, "prompt": prompt, "negative": negative,
                     "max_embeddings_multiples": mem, "clip_skip": skip, "n_tokens": cond.shape[1],
                     "kappa": kappa[0], "kappa_negative": kappa[1] if len(kappa) > 1 else None})
    # a batch: kohya sizes every prompt of a batch by the longest one (prompt or negative)
    batch_p = ["a (cat:1.2)", tag_text(100)]
    batch_n = ["", "(bad:1.1)"]
    pipe = pipes["v1"]
    with torch.no_grad():
        cond, uncond, _ = G.get_weighted_text_embeddings(pipe, batch_p, batch_n, max_embeddings_multiples=3, clip_skip=1)
    bout = {}
    for i in range(2):
        bout["cond%d" % i] = cond[i].contiguous()
        bout["uncond%d" % i] = uncond[i].contiguous()
    bmeta = {"version": "v1", "prompts": batch_p, "negatives": batch_n, "max_embeddings_multiples": 3, "clip_skip": 1}
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "weighting_batch.safetensors")
    save_file(bout, path, metadata={"case": json.dumps(bmeta, ensure_ascii=False, separators=(",", ":"))})
    print("wrote", os.path.relpath(path), os.path.getsize(path), "bytes")
    for v, (out, meta) in files.items():
        path = os.path.join(OUT, "weighting_%s.safetensors" % v)
        # one metadata key: safetensors writes the metadata map in hash order, so several keys
        # would make reruns differ byte-wise
        save_file(out, path, metadata={"cases": json.dumps(meta, ensure_ascii=False, separators=(",", ":"))})
        print("wrote", os.path.relpath(path), os.path.getsize(path), "bytes")


# ---- --from_file lines -------------------------------------------------------------------

def kohya_main_statements():
    tree = ast.parse(open(os.path.join(KOHYA, "gen_img_diffusers.py"), encoding="utf-8").read())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    line_stmts = file_stmt = None
    for node in ast.walk(main):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for i, st in enumerate(body):
            if isinstance(st, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "width" for t in st.targets) \
                    and ast.unparse(st.value) == "args.W":
                end = next(j for j in range(i, len(body)) if isinstance(body[j], ast.For)
                           and ast.unparse(body[j].target) == "parg")
                line_stmts = body[i:end + 1]
            if isinstance(st, ast.If) and ast.unparse(st.test) == "args.from_file is not None":
                file_stmt = st
    assert line_stmts and file_stmt
    mod = ast.Module(body=line_stmts, type_ignores=[])
    file_mod = ast.Module(body=[file_stmt], type_ignores=[])
    return compile(mod, "gen_img_diffusers.py<main loop>", "exec"), compile(file_mod, "gen_img_diffusers.py<from_file>", "exec")


LINE_CODE, FILE_CODE = kohya_main_statements()
UNSET = "UNSET"
N_NETWORKS = 3


def kohya_line(line):
    args = types.SimpleNamespace(W=UNSET, H=UNSET, scale=UNSET, negative_scale=UNSET, steps=UNSET, strength=UNSET)
    ns = {"args": args, "prompt": line, "prompt_index": 0, "prompt_list": [line], "networks": [None] * N_NETWORKS,
          "re": re}
    buf = io.StringIO()
    with redirect_stdout(buf):
        exec(LINE_CODE, ns)
    errors = [ln.split(": ", 1)[1] for ln in buf.getvalue().splitlines() if ln.startswith("Exception in parsing")]

    def val(k):
        v = ns[k]
        return None if v == UNSET else v
    return {
        "line": line, "prompt": ns["prompt"], "negative": ns["negative_prompt"], "clip_prompt": ns["clip_prompt"],
        "width": val("width"), "height": val("height"), "steps": val("steps"), "scale": val("scale"),
        "negative_scale": "none" if ns["negative_scale"] is None else val("negative_scale"),
        "strength": val("strength"),
        "seeds": None if ns["seeds"] is None else [str(v) for v in ns["seeds"]],   # above 2^63: as text
        "network_muls": ns["network_muls"],
        "errors": errors,
    }


LINES = [
    "a cat",
    "a cat --n dog",
    "a cat --n blurry, (low quality:1.4) --w 768 --h 512 --s 30 --d 42 --l 7.5",
    "  a cat   --W 640 --H 448 --S 20 --D 1,2,3 --L 8 --N Bad Hands  ",
    "portrait --s 0",
    "portrait --s 99999",
    "portrait --s 1500",
    "x --d 12345678901234567890",
    "x --d 7,8",
    "x --l 1.",
    "x --l .5",
    "x --l 12.5abc",
    "x --w 512px",
    "x --nl 2.5",
    "x --nl none",
    "x --nl NONE",
    "x --nl None",
    "x --t 0.6",
    "x --c a clip prompt --n neg",
    "x --am 0.5",
    "x --am 0.5,1.0",
    "x --am 1,-0.5,2,3",
    "x --am -1.5",
    "x --unknown 5 --w 256",
    "x --w abc",
    "x --n first --n second",
    "x --n  two spaces",
    "x -- n spaced",
    "x ---n triple",
    "x --n a --w 64 -- --h 32",
    "--n leading",
    "x--n no space",
    "x\t--n tab",
    "x --l 1.2.3",
    "x --d 1,,2",
    "x --d ,5",
    "x --am 1,",
    "x --am 1-2",
    "x --am -",
    "x --t .",
    "x --nl .",
    "x --n",
    "x --n ",
    "x --w 512 --w 640",
    "(emphasis:1.2) BREAK second --n neg --am 0.8",
    "a\u3000cat\u3000 --n dog\u00a0",
    "x --s 25 --l 7 --t 0.75 --nl 1.5 --c clip --am 1,0.5",
]

FILE_TEXT = ("first prompt --n neg\n"
             "\n"
             "   \t \n"
             "second --w 512\r\n"
             "third --s 10\r"
             "fourth\u2028fifth --d 3\x0bsixth\x1cseventh\u0085\n"
             "\u3000\n"
             "last line without newline --l 6")


def kohya_file(text):
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False, newline="") as f:
        f.write(text)
        path = f.name
    ns = {"args": types.SimpleNamespace(from_file=path, prompt=None), "open": open}
    with redirect_stdout(io.StringIO()):
        exec(FILE_CODE, ns)
    os.unlink(path)
    return ns["prompt_list"]


def main():
    toks = reference_tokenizers()
    os.makedirs(OUT, exist_ok=True)
    parse = [{"text": p, "pieces": G.parse_prompt_attention(p)} for p in PARSE_PROMPTS]
    with open(os.path.join(OUT, "parse.json"), "w", encoding="utf-8") as f:
        json.dump({"source": "gen_img_diffusers.py parse_prompt_attention @ 75d1883", "cases": parse}, f,
                  ensure_ascii=False, indent=1)
    lines = [kohya_line(ln) for ln in LINES]
    file_lines = kohya_file(FILE_TEXT)
    with open(os.path.join(OUT, "lines.json"), "w", encoding="utf-8") as f:
        json.dump({"source": "gen_img_diffusers.py main() prompt loop @ 75d1883", "networks": N_NETWORKS,
                   "lines": lines, "file_text": FILE_TEXT, "file_lines": file_lines}, f, ensure_ascii=False, indent=1)
    print("wrote parse.json (%d), lines.json (%d lines, %d file lines)" % (len(parse), len(lines), len(file_lines)))
    make_weighting(toks)


if __name__ == "__main__":
    main()
