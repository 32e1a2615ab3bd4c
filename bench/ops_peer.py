"""Peer of bench_ops: kohya extract_lora_from_models.py's per-module work on PyTorch CPU,
torch.linalg.svd (full_matrices=True as kohya, and economy), on the same 264 SD1.5 shapes at
dim 64: one module per distinct shape timed and scaled by its count (like bench_ops subset).
usage: ops_peer.py THREADS   prints "name seconds" lines and '#' notes."""
import sys
import time

import torch

SHAPES = [(768, 768, 48), (3072, 768, 12), (768, 3072, 12),
          (320, 320, 40), (320, 768, 10), (2560, 320, 5), (320, 1280, 5),
          (640, 640, 40), (640, 768, 10), (5120, 640, 5), (640, 2560, 5),
          (1280, 1280, 48), (1280, 768, 12), (10240, 1280, 6), (1280, 5120, 6)]


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    torch.set_num_threads(threads)
    r = 64
    g = torch.Generator().manual_seed(0)
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, one module per shape timed x count")
    tot = {"extract_exact": 0.0, "extract_economy": 0.0}
    for out, inn, count in SHAPES:
        base = torch.randn(out, inn, generator=g) * 0.02
        tuned = base + torch.randn(out, inn, generator=g) * 1e-3
        for name, full in (("extract_exact", True), ("extract_economy", False)):
            t0 = time.perf_counter()
            d = (tuned - base).float()
            U, S, Vh = torch.linalg.svd(d, full_matrices=full)
            up = U[:, :r] @ torch.diag(S[:r])
            down = Vh[:r, :]
            t = time.perf_counter() - t0
            tot[name] += t * count
            print(f"# {out:5d}x{inn:<5d} x{count:<2d} {name} {t:.3f} s/module")
    for k, v in tot.items():
        print(f"{k} {v:.3f}")


if __name__ == "__main__":
    main()
