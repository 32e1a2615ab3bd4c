"""Peer for bench_clip: transformers 4.25.1 CLIPTextModel (CLIP ViT-L/14 text config, random
weights) on PyTorch CPU, the same cases as bench/bench_clip.c. Prints "name ms" (median after
one warm-up). Needs tests/reference/.venv.

The peer gets its best configuration: Debian's torch runs its GEMMs in OpenBLAS (pthread
build, which sizes its own pool to the cores) next to torch's OpenMP pool, and the two fight
when torch uses more than one thread (a 77x768x3072 addmm: 2.3 ms with torch threads = 1,
6.6 ms with 2 on a 2-core machine). So every case is timed with torch.set_num_threads(1) and
(THREADS) and the faster is printed; a "#" line says which won.

    python bench/clip_peer.py [REPS] [THREADS]
"""
import statistics
import sys
import time

import torch
from transformers import CLIPTextConfig, CLIPTextModel


class LoRALinear(torch.nn.Module):
    """kohya LoRAModule forward: base(x) + up(down(x)) * multiplier * scale."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.up.weight, std=0.05)
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + self.up(self.down(x)) * self.scale


def median_ms(reps, fn):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else torch.get_num_threads()
    settings = sorted({1, threads})
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                         hidden_act="quick_gelu")
    te = CLIPTextModel(cfg).eval()
    print("# peer: torch %s, transformers CLIPTextModel, torch threads tried %s" % (torch.__version__, settings))
    won = {}

    def best(name, fn):
        res = []
        for th in settings:
            torch.set_num_threads(th)
            res.append((median_ms(reps, fn), th))
        ms, th = min(res)
        won[name] = th
        print("%s %.2f" % (name, ms))
    ids = torch.full((4, 77), 49407, dtype=torch.int64)
    ids[:, 0] = 49406
    for b in range(4):
        for t in range(1, 21):
            ids[b, t] = 1000 + 97 * (b * 31 + t) % 40000
    for batch in (1, 4):
        x = ids[:batch].contiguous()
        with torch.no_grad():
            best("clip_fwd_b%d" % batch, lambda: te(x))

    # LoRA step: rank 8 on all q/k/v/out/fc1/fc2, base frozen, forward + backward
    for p in te.parameters():
        p.requires_grad_(False)
    for layer in te.text_model.encoder.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "out_proj")),
                              (layer.mlp, ("fc1", "fc2"))):
            for n in names:
                setattr(parent, n, LoRALinear(getattr(parent, n), 8, 1.0))
    te.train()
    dout = torch.rand((1, 77, 768)) * 2 - 1
    x = ids[:1].contiguous()

    def step():
        out = te(x).last_hidden_state
        out.backward(dout)
    best("clip_lora_step_b1", step)
    print("# peer torch threads that won: %s" % ", ".join("%s=%d" % kv for kv in won.items()))


if __name__ == "__main__":
    main()
