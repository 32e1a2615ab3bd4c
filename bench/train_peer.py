"""Peer for bench_train: one kohya-style LoRA training step on PyTorch CPU with diffusers 0.10.2's
UNet2DConditionModel and transformers' CLIPTextModel in the SD 1.5 configuration (random
weights, fp32) and the LoRA math of kohya's networks/lora.py (rank 4, alpha 1: y = W x +
up(down(x)) * alpha/rank on the Linear / 1x1-conv children of every Transformer2DModel and of
the text encoder's CLIPAttention / CLIPMLP), base weights frozen, text-encoder LoRA trained:
text encoder -> U-Net on a cached (random) latent -> MSE against the noise -> backward ->
clip_grad_norm_(1) -> AdamW. Cases as bench/bench_train.c: with gradient checkpointing
(diffusers' enable_gradient_checkpointing + the text encoder's) and without. Prints
"name seconds" (median of REPS) and "#" lines with the peak resident memory.

    python bench/train_peer.py [REPS] [THREADS] [MODEL_DIR]   (MODEL_DIR: a diffusers folder for a
                                                              smoke run, e.g. tests/data/sd/v1_diffusers)
"""
import math
import resource
import statistics
import sys
import time

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

RANK, ALPHA = 4, 1.0


class LoRA(torch.nn.Module):
    def __init__(self, base):
        super().__init__()
        conv = isinstance(base, torch.nn.Conv2d)
        fin = base.in_channels if conv else base.in_features
        fout = base.out_channels if conv else base.out_features
        if conv:
            self.down = torch.nn.Conv2d(fin, RANK, 1, bias=False)
            self.up = torch.nn.Conv2d(RANK, fout, 1, bias=False)
        else:
            self.down = torch.nn.Linear(fin, RANK, bias=False)
            self.up = torch.nn.Linear(RANK, fout, bias=False)
        torch.nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.up.weight)
        self.scale = ALPHA / RANK
        self.base_forward = base.forward
        base.forward = self.forward

    def forward(self, x):
        return self.base_forward(x) + self.up(self.down(x)) * self.scale


def apply_lora(root, parents):
    mods = []
    for _, m in root.named_modules():
        if m.__class__.__name__ in parents:
            for _, c in m.named_modules():
                if isinstance(c, torch.nn.Linear) or (isinstance(c, torch.nn.Conv2d) and c.kernel_size == (1, 1)):
                    mods.append(LoRA(c))
    return mods


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else torch.get_num_threads()
    model_dir = sys.argv[3] if len(sys.argv) > 3 else None
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if model_dir:
        unet = UNet2DConditionModel.from_pretrained(model_dir + "/unet").float()
        te = CLIPTextModel.from_pretrained(model_dir + "/text_encoder").float()
    else:
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                          num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                          hidden_act="quick_gelu"))
    for p in list(unet.parameters()) + list(te.parameters()):
        p.requires_grad_(False)
    loras = apply_lora(te, {"CLIPAttention", "CLIPMLP"}) + apply_lora(unet, {"Transformer2DModel"})
    params = [p for m in loras for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    side = unet.config.sample_size if model_dir else 64
    # requires_grad so that checkpointed blocks (reentrant torch.utils.checkpoint) run their backward
    lat = (torch.randn(1, unet.config.in_channels, side, side) * 0.18215).requires_grad_(True)
    ids = torch.randint(0, te.config.vocab_size, (1, 77))
    t = torch.tensor([500])
    print(f"# diffusers UNet2DConditionModel + CLIPTextModel ({'from ' + model_dir if model_dir else 'SD1.5 config'}), "
          f"latent {side}x{side}, {len(loras)} LoRA modules, torch {torch.__version__}, threads {threads}")

    def step():
        noise = torch.randn_like(lat)
        ehs = te(ids)[0]
        pred = unet(lat + noise, t, ehs).sample   # the add_noise scaling does not change the cost
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name, ckpt in (("train_step_ckpt", True), ("train_step", False)):
        unet.train()
        te.train()
        if ckpt:
            unet.enable_gradient_checkpointing()
            te.gradient_checkpointing_enable()
            te.text_model.embeddings.requires_grad_(True)   # kohya's fix so checkpointed TE LoRA gets grads
        else:
            unet.disable_gradient_checkpointing()
            te.gradient_checkpointing_disable()
        ts = []
        for _ in range(reps):
            s = time.perf_counter()
            step()
            ts.append(time.perf_counter() - s)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1048576.0
        print(f"# {name}: peak RSS so far {rss:.2f} GiB")
        print(f"{name} {statistics.median(ts):.3f}")


if __name__ == "__main__":
    main()
