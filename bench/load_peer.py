"""Peer for bench_load: writes an SD 1.5-sized checkpoint with random fp16 weights (the real
U-Net/VAE/CLIP-L shape set, ~1.07 B parameters, LDM key names via the fixture converter in
tests/reference/make_sd_fixtures.py) as .safetensors and .ckpt, then times the Python readers
on them: safetensors.torch.load_file and torch.load. Needs tests/reference/.venv.

    python bench/load_peer.py write DIR      # once: DIR/sd15_random.{safetensors,ckpt}
    python bench/load_peer.py time DIR [REPS]
    python bench/load_peer.py check ORIGINAL ROUNDTRIP DIFFUSERS_DIR
                                             # LDM -> diffusers -> LDM kept every network tensor,
                                             # and diffusers loads the SD 1.5-shaped folder
"""
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))


def write(d):
    import make_sd_fixtures as F
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                      num_hidden_layers=12, hidden_act="quick_gelu"))
    sds = [{k: v.half() for k, v in m.state_dict().items() if k != "text_model.embeddings.position_ids"} for m in (unet, vae, te)]
    ldm, _, _ = F.to_ldm("v1", sds[0], sds[1], sds[2], unet.config, torch.Generator().manual_seed(0))
    n = sum(v.numel() for v in ldm.values())
    print("parameters: %d (%.2f GB fp16)" % (n, 2 * n / 1e9))
    save_file(ldm, os.path.join(d, "sd15_random.safetensors"))
    torch.save({"state_dict": ldm, "epoch": 0, "global_step": 0}, os.path.join(d, "sd15_random.ckpt"))


def median(fn, reps):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
        del out
    ts.sort()
    return ts[len(ts) // 2]


def time_them(d, reps):
    from safetensors.torch import load_file
    st, ck = os.path.join(d, "sd15_random.safetensors"), os.path.join(d, "sd15_random.ckpt")
    # touch every tensor so lazily mapped data is really read
    # load_file maps the file and reads pages on first touch, as lora_model_load does
    print("safetensors_load_file(mmap) %.3f" % median(lambda: load_file(st), reps))
    print("torch_load %.3f" % median(lambda: torch.load(ck, map_location="cpu"), reps))


def check(orig, back, folder):
    from safetensors.torch import load_file
    from diffusers import UNet2DConditionModel
    a, b = load_file(orig), load_file(back)
    common = set(a) & set(b)
    bad = [k for k in common if not torch.equal(a[k], b[k])]
    print("round trip: %d tensors equal, %d differ, %d only in the original (%s), %d only in the copy"
          % (len(common) - len(bad), len(bad), len(set(a) - set(b)), ", ".join(sorted(set(a) - set(b))),
             len(set(b) - set(a))))
    u = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"))
    print("diffusers 0.10.2 loads our SD 1.5-shaped U-Net: %d parameters" % sum(p.numel() for p in u.parameters()))
    return 1 if bad or set(b) - set(a) else 0


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2])
    elif sys.argv[1] == "check":
        sys.exit(check(sys.argv[2], sys.argv[3], sys.argv[4]))
    else:
        time_them(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 3)
