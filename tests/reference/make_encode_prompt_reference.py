#!/usr/bin/env python3
"""Reference conditioning for lora_model_encode_prompt: prompt text -> kohya's ids ->
transformers 4.25.1 CLIPTextModel -> kohya's get_hidden_states (clip_skip, 150/225 re-join).

    tests/reference/.venv/bin/python tests/reference/make_encode_prompt_reference.py

The tiny test text encoders (tests/data/sd/vN_diffusers/text_encoder) have 256/288-token
vocabularies, so real CLIP ids do not fit them. Here their token embedding is replaced by a
49408-row table given by a formula that the C test rebuilds exactly:
    E[r, c] = (((r * 31 + c * 17) % 97) - 48) / 64        (exact in float16 and float32)
Everything else is the committed model, run in float32. Writes
tests/data/sd/encode_prompt_reference.safetensors with, per case, the ids and the [tokens, width]
conditioning, and the case list in the metadata.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_tokenizer_fixtures import kohya_input_ids, reference_tokenizers  # noqa: E402

SD = os.path.normpath(os.path.join(HERE, "..", "data", "sd"))
VOCAB = 49408

CASES = [  # (name, version, prompt, max_token_length, clip_skip)
    ("v1_short", "v1", "a photo of a cat, masterpiece, (best quality:1.2)", 75, 1),
    ("v1_skip2", "v1", "1girl, solo, long hair, looking at viewer, smile", 75, 2),
    ("v1_long225", "v1", ", ".join("tag%d" % i for i in range(90)), 225, 1),
    ("v1_empty150", "v1", "", 150, 2),
    ("v2_short", "v2", "a photograph of an astronaut riding a horse!!!", 75, 1),
    ("v2_long150_skip2", "v2", " ".join("word%d" % i for i in range(60)) + ", café “quoted” ﬁne", 150, 2),
]


def formula_embedding(hidden):
    r = torch.arange(VOCAB, dtype=torch.int64).unsqueeze(1)
    c = torch.arange(hidden, dtype=torch.int64).unsqueeze(0)
    return (((r * 31 + c * 17) % 97) - 48).to(torch.float32) / 64.0


def kohya_hidden_states(model, ids, max_token_length, clip_skip):
    """train_util.get_hidden_states (FEB) for a batch of one prompt."""
    input_ids = torch.tensor(ids, dtype=torch.int64).reshape(-1, 77)
    out = model(input_ids, output_hidden_states=True, return_dict=True)
    if clip_skip is None or clip_skip <= 1:
        h = out.last_hidden_state
    else:
        h = model.text_model.final_layer_norm(out.hidden_states[-clip_skip])
    h = h.reshape(1, -1, h.shape[-1])
    if max_token_length is not None and max_token_length > 75:
        parts = [h[:, 0].unsqueeze(1)]   # BOS of the first chunk
        n = max_token_length // 75
        for k in range(n):
            parts.append(h[:, k * 77 + 1:k * 77 + 76])
        parts.append(h[:, -1].unsqueeze(1))
        h = torch.cat(parts, dim=1)
    return h[0]


def main():
    toks = reference_tokenizers()
    models = {}
    for v in ("v1", "v2"):
        m = CLIPTextModel.from_pretrained(os.path.join(SD, v + "_diffusers", "text_encoder")).float().eval()
        emb = torch.nn.Embedding(VOCAB, m.config.hidden_size)
        emb.weight.data = formula_embedding(m.config.hidden_size)
        m.text_model.embeddings.token_embedding = emb
        m.config.vocab_size = VOCAB
        models[v] = m
    out, meta = {}, []
    with torch.no_grad():
        for name, v, prompt, mtl, skip in CASES:
            ids = kohya_input_ids(toks[v], prompt, None if mtl == 75 else mtl)
            h = kohya_hidden_states(models[v], ids, None if mtl == 75 else mtl, skip)
            assert h.shape[0] == mtl + 2, (name, h.shape)
            out[name + ".ids"] = torch.tensor(ids, dtype=torch.int32)
            out[name + ".cond"] = h.contiguous()
            meta.append({"name": name, "version": v, "prompt": prompt, "max_token_length": mtl, "clip_skip": skip})
    path = os.path.join(SD, "encode_prompt_reference.safetensors")
    save_file(out, path, metadata={"cases": json.dumps(meta, ensure_ascii=False, separators=(",", ":")),
                                   "embedding": "E[r,c] = (((r*31 + c*17) % 97) - 48) / 64"})
    print("wrote", os.path.relpath(path), os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
