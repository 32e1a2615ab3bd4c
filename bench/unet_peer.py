"""Peer for bench_unet: diffusers 0.10.2 UNet2DConditionModel with the SD 1.5 config (random
weights, fp32) on PyTorch CPU: 64x64 latent, batch 1, 77-token context. Cases as in
bench/bench_unet.c: forward (no_grad) and forward + backward to the input latent and the
context (weights frozen). Prints "name seconds" (median of REPS) and "#" lines with the peak
resident memory.

    python bench/unet_peer.py [REPS] [THREADS]
"""
import resource
import statistics
import sys
import time

import torch
from diffusers import UNet2DConditionModel


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
    for p in unet.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 4, 64, 64)
    ctx = torch.randn(1, 77, 768)
    t = torch.tensor([500])
    print(f"# diffusers UNet2DConditionModel (SD1.5 config), torch {torch.__version__}, threads {threads}")

    def fwd():
        with torch.no_grad():
            unet(x, t, ctx)

    def fwd_bwd():
        xi = x.clone().requires_grad_(True)
        ci = ctx.clone().requires_grad_(True)
        y = unet(xi, t, ci).sample
        y.backward(torch.ones_like(y))

    for name, fn in (("unet_fwd", fwd), ("unet_fwd_bwd", fwd_bwd)):
        ts = []
        for _ in range(reps):
            s = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - s)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1048576.0
        print(f"# {name}: peak RSS so far {rss:.2f} GiB")
        print(f"{name} {statistics.median(ts):.3f}")


if __name__ == "__main__":
    main()
