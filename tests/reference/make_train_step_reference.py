#!/usr/bin/env python3
"""Fixture for tests/parity/test_train_step.c: one kohya-ss sd-scripts training step (the math
of train_network.py at commit 75d1883da630c033841ff7fc79a94ca7131dd3d3) on the tiny diffusers
models of tests/data/sd, with kohya's own networks/lora.py.

  git -C <sd-scripts clone> archive 75d1883da630c033841ff7fc79a94ca7131dd3d3 networks library | tar -x -C /tmp/kohya
  tests/reference/.venv/bin/python tests/reference/make_train_step_reference.py --kohya /tmp/kohya

library/train_util.py is replaced by a stub module (as in make_network_fixtures.py).

Case v1 (eps target, dim 4, alpha 2, lr 1e-3 for both groups, clip_skip 1, max_grad_norm 0.1:
the total norm is about 0.56, so 1.0 would not clip and the clipping would go untested). A v2 case (v-prediction,
clip_skip 2, separate learning rates) is in the list but off: its files would take the fixture
directory past its size budget (tests/data/train < 400 KB).
  create_network(1.0, dim, alpha, None, te, unet) after torch.manual_seed(1234) (kohya's init:
  down kaiming-uniform, up zeros); apply_to(te, unet, True, True) (the network's state_dict is
  empty before it); then lora_up weights set to seeded randn * 0.1 so gradients reach lora_down
  and the LoRA changes the forward; every weight rounded to float16 (so the fp16 file below holds
  them exactly and both sides start from the same values).
  ehs   = final_layer_norm(hidden_states[-clip_skip]) of text_encoder(input_ids) (kohya
          get_hidden_states without max_token_length)
  noisy = DDPMScheduler(scaled_linear 0.00085..0.012, 1000).add_noise(latents, noise, t)
  pred  = unet(noisy, t, ehs).sample
  target = noise (v1) or scheduler.get_velocity(latents, noise, t) (v2)
  loss  = (mse(pred, target, reduction="none").mean([1,2,3]) * loss_weights).mean()
  loss.backward(); clip_grad_norm_(params, max_norm); AdamW(betas default, eps 1e-8, wd 0.01).step()

Writes tests/data/train/vN_lora.safetensors (network.save_weights(float16) before the step:
exact, see above) and tests/data/train/vN_step.safetensors:
  in.latents [B,4,8,8], in.noise, in.timesteps int64 [B], in.input_ids int64 [B,77],
  in.loss_weights [B], cfg (float32 [6]: v_param, clip_skip, te_lr, unet_lr, max_grad_norm, wd),
  loss [1], total_norm [1] (before clipping), grad [N] (every LoRA weight gradient before
  clipping, concatenated flat in the byte order of the keys "<module>.lora_down.weight" /
  "<module>.lora_up.weight" sorted as strings), after [N] (the weights after the AdamW step, same
  order). Parameters that got no gradient (none here) would be stored as zeros in grad.
"""
import argparse, hashlib, os, sys, types

import torch
from safetensors.torch import save_file, save as st_save

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "tests", "data", "train")


def precalculate_hashes(state_dict, metadata):
    meta = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = st_save(state_dict, meta)
    n = int.from_bytes(b[:8], "little")
    return hashlib.sha256(b[8 + n:]).hexdigest(), hashlib.sha256(b[0x100000:0x110000]).hexdigest()[:8]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kohya", required=True)
    a = ap.parse_args()
    lib = types.ModuleType("library")
    lib.__path__ = [os.path.join(a.kohya, "library")]
    tu = types.ModuleType("library.train_util")
    tu.precalculate_safetensors_hashes = precalculate_hashes
    sys.modules["library"] = lib
    sys.modules["library.train_util"] = tu
    sys.path.insert(0, os.path.join(a.kohya, "networks"))
    sys.path.insert(0, a.kohya)
    import lora
    from diffusers import UNet2DConditionModel, DDPMScheduler
    from transformers import CLIPTextModel
    import torch.nn.functional as F

    os.makedirs(OUT, exist_ok=True)
    cases = [dict(v=1, dim=4, alpha=2.0, v_param=False, te_lr=1e-3, unet_lr=1e-3, clip_skip=1, max_norm=0.1),
             dict(v=2, dim=1, alpha=2.0, v_param=True, te_lr=5e-5, unet_lr=1e-4, clip_skip=2, max_norm=1.0)][:1]
    for c in cases:
        v = c["v"]
        d = os.path.join(ROOT, "tests", "data", "sd", f"v{v}_diffusers")
        unet = UNet2DConditionModel.from_pretrained(d, subfolder="unet").float()
        te = CLIPTextModel.from_pretrained(d, subfolder="text_encoder").float()
        unet.requires_grad_(False)
        te.requires_grad_(False)
        torch.manual_seed(1234)
        net = lora.create_network(1.0, c["dim"], c["alpha"], None, te, unet)
        # kohya's LoRANetwork registers its modules (and so has a state_dict) only in apply_to:
        # apply first, then set and round the weights (before, the loops below ran over an empty
        # state_dict, lora_up stayed zero and lora_down unrounded float32 while the saved file
        # held fp16-rounded values)
        net.apply_to(te, unet, True, True)
        assert len(net.state_dict()) == 3 * (len(net.text_encoder_loras) + len(net.unet_loras))
        g = torch.Generator().manual_seed(500 + v)
        with torch.no_grad():
            for k, p in sorted(net.state_dict().items()):
                if k.endswith("lora_up.weight"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            for k, p in net.state_dict().items():
                if k.endswith(".weight"):
                    p.copy_(p.half().float())
        net.save_weights(os.path.join(OUT, f"v{v}_lora.safetensors"), torch.float16,
                         {"ss_network_module": "networks.lora", "ss_network_dim": str(c["dim"]),
                          "ss_network_alpha": str(c["alpha"])})
        before = {k: t.detach().clone() for k, t in net.state_dict().items()}

        B, T = 2, te.config.max_position_embeddings
        latents = torch.randn((B, 4, 8, 8), generator=g)
        noise = torch.randn((B, 4, 8, 8), generator=g)
        timesteps = torch.tensor([37, 812] if v == 1 else [999, 5], dtype=torch.int64)
        ids = torch.full((B, T), te.config.pad_token_id, dtype=torch.int64)
        ids[:, 0] = te.config.bos_token_id
        ids[0, 1:7] = torch.randint(3, te.config.vocab_size, (6,), generator=g)
        ids[0, 7] = te.config.eos_token_id
        ids[1, 1:T - 1] = torch.randint(3, te.config.vocab_size, (T - 2,), generator=g)
        ids[1, T - 1] = te.config.eos_token_id
        loss_weights = torch.tensor([1.0, 0.75])

        sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
        te_params = [p for m in net.text_encoder_loras for p in m.parameters()]
        unet_params = [p for m in net.unet_loras for p in m.parameters()]
        opt = torch.optim.AdamW([{"params": te_params, "lr": c["te_lr"]},
                                 {"params": unet_params, "lr": c["unet_lr"]}],
                                betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        net.train()
        enc = te(ids, output_hidden_states=True, return_dict=True)
        if c["clip_skip"] > 1:
            ehs = te.text_model.final_layer_norm(enc["hidden_states"][-c["clip_skip"]])
        else:
            ehs = enc["last_hidden_state"]
        noisy = sched.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, ehs).sample
        target = sched.get_velocity(latents, noise, timesteps) if c["v_param"] else noise
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean([1, 2, 3])
        loss = (loss * loss_weights).mean()
        loss.backward()
        params = dict(net.named_parameters())
        keys = sorted(params)
        grad = torch.cat([(params[k].grad if params[k].grad is not None else torch.zeros_like(params[k])).detach().reshape(-1)
                          for k in keys])
        total = torch.nn.utils.clip_grad_norm_(te_params + unet_params, c["max_norm"])
        opt.step()
        after = torch.cat([params[k].detach().reshape(-1) for k in keys])
        out = {"in.latents": latents, "in.noise": noise, "in.timesteps": timesteps, "in.input_ids": ids,
               "in.loss_weights": loss_weights,
               "cfg": torch.tensor([float(c["v_param"]), c["clip_skip"], c["te_lr"], c["unet_lr"], c["max_norm"], 0.01]),
               "loss": loss.detach().reshape(1), "total_norm": total.detach().reshape(1).float()}
        out["grad"] = grad
        out["after"] = after
        save_file({k: t.contiguous() for k, t in out.items()}, os.path.join(OUT, f"v{v}_step.safetensors"))
        print(f"v{v}: {len(net.text_encoder_loras)} TE + {len(net.unet_loras)} U-Net modules, loss {loss.item():.8f}, "
              f"total norm {total.item():.6f}, {len(keys)} weights, {grad.numel()} floats")


if __name__ == "__main__":
    main()
