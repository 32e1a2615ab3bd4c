#!/usr/bin/env python3
"""Writes tests/data/sd/vN_clip_lora_reference.safetensors: transformers 4.25.1 CLIPTextModel
outputs of the tiny SD v1/v2 text encoders (tests/data/sd/vN_diffusers/text_encoder), with and
without kohya-style LoRA adapters, the LoRA gradients from torch autograd, and kohya's
--max_token_length 225 chunking, for tests/parity/test_clip.c.

    tests/reference/.venv/bin/python tests/reference/make_clip_reference.py

float16 weights cast to float32 (exact), all computation in float32 on the CPU, one thread,
deterministic algorithms: a rerun writes the same bytes.

Tensors (C order; C = hidden size, ids int64):
  ids                       [2, 77] prompt 0 = bos, 10 tokens, eos, padding; prompt 1 = bos,
                            75 tokens, eos. v1 pads with eos, v2 with pad_token_id.
  last_hidden_state         [2, 77, C] text_encoder(ids).last_hidden_state
  clip_skip2                final_layer_norm(hidden_states[-2]) (kohya clip_skip=2)
  pooled                    [2, C] pooler_output (last_hidden_state at argmax(ids))
  lora.alpha, lora.multiplier   0-d float32; scale = alpha / rank * multiplier
  lora.layers.L.MODULE.down [rank, in]  (MODULE = self_attn.q_proj ... mlp.fc2; every layer)
  lora.layers.L.MODULE.up   [out, rank]  down ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform
                            a=sqrt(5) bound), up ~ N(0, 0.05^2): non-zero so the LoRA path
                            contributes (a fresh kohya network has up = 0)
  loss_weights              [2, 77, C] N(0, 1)
  lora_out.last_hidden_state, lora_out.clip_skip2, lora_out.pooled: outputs with LoRA, where
                            each wrapped Linear computes base(x) + up(down(x)) * multiplier *
                            scale (kohya LoRAModule.forward)
  grad1.layers.L.MODULE.down/up: d sum(lora_out.last_hidden_state * loss_weights) / d param
  grad2.layers.L.MODULE.down/up: d sum(lora_out.clip_skip2 * loss_weights) / d param
  long.ids                  [3, 227] prompts of 200, 10 and 150 tokens for
                            --max_token_length 225 (bos, tokens, eos, padding)
  long.chunk_ids            [9, 77] kohya's split (train_util get_input_ids): chunk k =
                            bos + ids[1+75k : 76+75k] + ids[-1]; v2 (pad != eos): chunk[-2] not
                            in {eos, pad} -> chunk[-1] = eos; chunk[1] == pad -> chunk[1] = eos
  long.out                  [3, 227, C] kohya's get_hidden_states re-join of the chunk
                            encodings (no LoRA, clip_skip None)
"""
import json
import os

import numpy as np
import safetensors
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

HERE = os.path.dirname(os.path.abspath(__file__))
SD = os.path.normpath(os.path.join(HERE, "..", "data", "sd"))
F32 = torch.float32
SEEDS = {"v1": 5101, "v2": 5102}
RANK = {"v1": 4, "v2": 3}
ALPHA = {"v1": 2.0, "v2": 3.0}     # v2: alpha = rank (scale 1)
MULTIPLIER = {"v1": 0.75, "v2": 1.0}
MODULES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
           "mlp.fc1", "mlp.fc2"]
LONG_TOKENS = [200, 10, 150]


class LoRALinear(torch.nn.Module):
    """base(x) + up(down(x)) * multiplier * scale, no bias (kohya networks/lora.py)."""

    def __init__(self, base, down, up, scale, multiplier):
        super().__init__()
        self.base = base
        self.down = torch.nn.Parameter(down.clone())
        self.up = torch.nn.Parameter(up.clone())
        self.scale = scale
        self.multiplier = multiplier

    def forward(self, x):
        h = torch.nn.functional.linear(x, self.down)
        return self.base(x) + torch.nn.functional.linear(h, self.up) * self.multiplier * self.scale


def load_te(ver):
    d = os.path.join(SD, ver + "_diffusers", "text_encoder")
    te = CLIPTextModel.from_pretrained(d, torch_dtype=torch.float16)
    te.to(F32)
    te.eval()
    st = load_file(os.path.join(d, "model.safetensors"))
    sd = te.state_dict()
    for k, v in st.items():
        if v.is_floating_point():
            assert torch.equal(v.to(F32), sd[k]), k
    for p in te.parameters():
        p.requires_grad_(False)
    return te


def make_ids(cfg, gen, pad_id, counts, length):
    bos, eos, vocab = cfg.bos_token_id, cfg.eos_token_id, cfg.vocab_size
    lo = max(bos, eos, cfg.pad_token_id) + 1
    rows = []
    for n in counts:
        toks = torch.randint(lo, vocab, (n,), generator=gen, dtype=torch.int64).tolist()
        row = [bos] + toks + [eos]
        row += [pad_id] * (length - len(row))
        assert len(row) == length
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)


def kohya_split(ids, n_chunks, eos, pad):
    """train_util get_input_ids for max_token_length = 75 * n_chunks."""
    out = []
    for row in ids.tolist():
        for k in range(n_chunks):
            c = [row[0]] + row[1 + 75 * k: 1 + 75 * (k + 1)] + [row[-1]]
            if pad != eos:
                if c[-2] != eos and c[-2] != pad:
                    c[-1] = eos
                if c[1] == pad:
                    c[1] = eos
            assert len(c) == 77
            out.append(c)
    return torch.tensor(out, dtype=torch.int64)


def kohya_rejoin(enc, batch, max_token_length):
    """train_util get_hidden_states re-join (v1 branch; the v2 branch's fix-up compares the
    ids with the EOS *string* and never fires, so both versions compute this)."""
    h = enc.reshape(batch, -1, enc.shape[-1])
    parts = [h[:, 0:1]]
    for i in range(1, max_token_length, 77):
        parts.append(h[:, i:i + 75])
    parts.append(h[:, -1:])
    return torch.cat(parts, dim=1)


def compute(ver):
    torch.manual_seed(0)
    te = load_te(ver)
    cfg = te.config
    gen = torch.Generator().manual_seed(SEEDS[ver])
    pad_id = cfg.eos_token_id if ver == "v1" else cfg.pad_token_id
    out = {}
    ids = make_ids(cfg, gen, pad_id, [10, 75], 77)
    out["ids"] = ids
    fln = te.text_model.final_layer_norm
    with torch.no_grad():
        r = te(ids, output_hidden_states=True, return_dict=True)
        out["last_hidden_state"] = r.last_hidden_state
        out["clip_skip2"] = fln(r.hidden_states[-2])
        out["pooled"] = r.pooler_output

    # ---- LoRA on every q/k/v/out_proj, fc1, fc2 ----------------------------------------
    rank, alpha, mult = RANK[ver], ALPHA[ver], MULTIPLIER[ver]
    scale = alpha / rank
    out["lora.alpha"] = torch.tensor(alpha, dtype=F32)
    out["lora.multiplier"] = torch.tensor(mult, dtype=F32)
    wraps = {}
    for li, layer in enumerate(te.text_model.encoder.layers):
        for mod in MODULES:
            parent_name, child = mod.split(".")
            parent = getattr(layer, parent_name)
            base = getattr(parent, child)
            bound = 1.0 / base.in_features ** 0.5
            down = (torch.rand((rank, base.in_features), generator=gen, dtype=F32) * 2 - 1) * bound
            up = torch.randn((base.out_features, rank), generator=gen, dtype=F32) * 0.05
            w = LoRALinear(base, down, up, scale, mult)
            setattr(parent, child, w)
            name = "layers.%d.%s" % (li, mod)
            wraps[name] = w
            out["lora.%s.down" % name] = down
            out["lora.%s.up" % name] = up
    weights = torch.randn((2, 77, cfg.hidden_size), generator=gen, dtype=F32)
    out["loss_weights"] = weights
    for tag, pick in (("grad1", lambda r: r.last_hidden_state),
                      ("grad2", lambda r: fln(r.hidden_states[-2]))):
        for w in wraps.values():
            w.down.grad = None
            w.up.grad = None
        r = te(ids, output_hidden_states=True, return_dict=True)
        y = pick(r)
        loss = (y * weights).sum()
        loss.backward()
        if tag == "grad1":
            out["lora_out.last_hidden_state"] = y.detach()
            out["lora_out.pooled"] = r.pooler_output.detach()
        else:
            out["lora_out.clip_skip2"] = y.detach()
        for name, w in wraps.items():
            gd = w.down.grad if w.down.grad is not None else torch.zeros_like(w.down)
            gu = w.up.grad if w.up.grad is not None else torch.zeros_like(w.up)
            out["%s.%s.down" % (tag, name)] = gd.detach().clone()
            out["%s.%s.up" % (tag, name)] = gu.detach().clone()
    # unwrap for the long-prompt part
    for name, w in wraps.items():
        li = int(name.split(".")[1])
        parent_name, child = name.split(".", 2)[2].split(".")
        setattr(getattr(te.text_model.encoder.layers[li], parent_name), child, w.base)

    # ---- --max_token_length 225 ---------------------------------------------------------
    long_ids = make_ids(cfg, gen, pad_id, LONG_TOKENS, 227)
    chunks = kohya_split(long_ids, 3, cfg.eos_token_id, pad_id)
    with torch.no_grad():
        enc = te(chunks).last_hidden_state
        out["long.out"] = kohya_rejoin(enc, long_ids.shape[0], 225)
    out["long.ids"] = long_ids
    out["long.chunk_ids"] = chunks

    for k, v in out.items():
        assert v.dtype in (F32, torch.int64), (k, v.dtype)
        out[k] = v.detach().contiguous().clone()
    info = {
        "description": "tests/reference/make_clip_reference.py: CLIP text encoder (tiny %s) outputs, "
                       "LoRA outputs and autograd gradients, --max_token_length 225" % ver,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "safetensors": safetensors.__version__, "numpy": np.__version__},
        "seed": SEEDS[ver], "rank": rank, "alpha": alpha, "multiplier": mult,
        "pad_id": pad_id, "eos_id": cfg.eos_token_id, "bos_id": cfg.bos_token_id,
    }
    return out, {"liblora_reference": json.dumps(info, sort_keys=True, separators=(",", ":"))}


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for ver in ("v1", "v2"):
        tensors, meta = compute(ver)
        path = os.path.join(SD, ver + "_clip_lora_reference.safetensors")
        save_file(tensors, path, metadata=meta)
        back = load_file(path)
        for k in tensors:
            assert torch.equal(back[k], tensors[k]), k
        print("wrote %s (%d tensors, %d bytes)" % (os.path.relpath(path, os.path.join(HERE, "..", "..")),
                                                   len(tensors), os.path.getsize(path)))


if __name__ == "__main__":
    main()
