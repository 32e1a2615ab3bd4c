"""Peer for bench_generate: diffusers 0.10.2 StableDiffusionPipeline on PyTorch CPU, fp32, with
the SD 1.5 architecture (random weights built as bench/load_peer.py builds them: UNet2DConditionModel
SD1.5 config, the SD VAE, a CLIP ViT-L text encoder), EulerAncestral, CFG 7.5 with a negative
prompt, SIZE x SIZE. Seconds per step from the step callback (the first step left out), the
VAE decode timed around pipe.decode_latents, and a kohya LoRA (networks/lora.py at rank 16 on
every target, forward hooks: how gen_img_diffusers applies --network_weights) against the same
weights merged, as seconds per step. Prints "name seconds" and "#" lines with the peak RSS.

    python bench/generate_peer.py [STEPS] [SIZE] [THREADS] [KOHYA_DIR]
"""
import os
import resource
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))


def build():
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from make_tokenizer_fixtures import reference_tokenizers
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                      num_hidden_layers=12, hidden_act="quick_gelu")).eval()
    sched = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=reference_tokenizers()["v1"], unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed_run(pipe, steps, size):
    marks, last = [], []

    def cb(i, t, latents):
        marks.append(time.perf_counter())
        last[:] = [latents.clone()]

    with torch.no_grad():
        pipe("a photograph of an astronaut riding a horse, masterpiece", height=size, width=size,
             num_inference_steps=steps, guidance_scale=7.5, negative_prompt="lowres, blurry",
             output_type="numpy", callback=cb, callback_steps=1, generator=torch.Generator().manual_seed(1))
        t0 = time.perf_counter()
        pipe.decode_latents(last[0])
        decode = time.perf_counter() - t0
    step = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else float("nan")
    return step, decode


def main():
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else torch.get_num_threads()
    kohya = sys.argv[4] if len(sys.argv) > 4 else "/tmp/kohya-full"
    torch.set_num_threads(threads)
    pipe = build()
    print(f"# diffusers StableDiffusionPipeline (SD1.5 architecture, random fp32 weights), torch {torch.__version__}, "
          f"threads {threads}, {size}x{size}, {steps} steps")
    step, decode = timed_run(pipe, steps, size)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1048576.0
    print(f"# peak RSS after the plain run: {rss:.2f} GiB")
    print(f"gen_cfg_step {step:.3f}")
    print(f"gen_vae_decode {decode:.3f}")
    if os.path.isdir(os.path.join(kohya, "networks")):
        import types
        lib = types.ModuleType("library")
        lib.__path__ = [os.path.join(kohya, "library")]
        tu = types.ModuleType("library.train_util")
        sys.modules["library"] = lib
        sys.modules["library.train_util"] = tu
        sys.path.insert(0, os.path.join(kohya, "networks"))
        import lora
        net = lora.create_network(1.0, 16, 8.0, pipe.vae, pipe.text_encoder, pipe.unet)
        net.apply_to(pipe.text_encoder, pipe.unet, True, True)
        rt, _ = timed_run(pipe, steps, size)
        print(f"gen_lora_runtime_step {rt:.3f}")
        # merged: the hooked forwards removed, the weights unchanged (lora_up is zero at init, so
        # the merge is a no-op and the base forward is what a merged model runs)
        for m in net.text_encoder_loras + net.unet_loras:
            org = m.org_forward
            owner = getattr(org, "__self__", None)
            if owner is not None:
                owner.forward = org
        mg, _ = timed_run(pipe, steps, size)
        print(f"gen_lora_merged_step {mg:.3f}")
        print(f"# LoRA runtime / merged seconds per step: {rt / mg:.3f}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1048576.0
    print(f"# peak RSS: {rss:.2f} GiB")


if __name__ == "__main__":
    main()
