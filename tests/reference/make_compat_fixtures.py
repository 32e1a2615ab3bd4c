#!/usr/bin/env python3
"""Compatibility fixtures for tests/parity/test_compat.c: LoRA files between liblora and
kohya-ss/sd-scripts (commit 75d1883da630c033841ff7fc79a94ca7131dd3d3, checked out OUTSIDE this
repository, as for make_network_fixtures.py), both ways, on the tiny models of tests/data/sd.

  ninja -C build-compat tests/parity/test_compat tools/lora
  tests/reference/.venv/bin/python tests/reference/make_compat_fixtures.py --kohya /tmp/kohya-full \\
      --build build-compat

Steps (everything lands in tests/data/compat/):
 1. `test_compat --write tests/data/compat` writes OUR LoRA files vN_ours_{float,fp16,bf16,conv}
    (lora_network_create with a seed, every lora_up set by a formula, saved with save_precision
    float/fp16/bf16; conv: conv_dim 2, saved fp16). The C test rewrites them and checks the bytes.
 2. kohya's networks/lora.py create_network_from_weights loads each of them (and the kohya files
    of step 3) onto the diffusers 0.10.2 / transformers 4.25.1 tiny models (float32), apply_to,
    and the U-Net output for a fixed latent/timestep/context and the text encoder's
    last_hidden_state for fixed ids are recorded at multiplier 1 and 0.5 (set_multiplier):
    reference.safetensors "<file stem>.m1.unet", ".m1.te", ".m0.5.unet", ".m0.5.te", the inputs
    "vN.latent/.timestep/.context/.ids", the outputs without LoRA "vN.base.unet/.te", and
    "count.compat/<file>" = the number of LoRA modules kohya created for the file.
 3. files kohya writes: create_network (torch.manual_seed) with random weights, save_weights in
    float / fp16 (v1_kohya_{float,fp16,conv}, v2_kohya_{float,fp16}); v1_kohya_noalpha is a
    float state dict without the alpha keys (files from before 2023-01-21). At this commit
    create_network_from_weights cannot load a file without alpha (it replaces its alpha dict by
    an int: TypeError), so that reference is the network created with alpha = dim (scale 1,
    the pre-alpha formula) with the file's weights loaded: the script checks that kohya's loader
    still fails that way and records it in compat_tools.json.
 4. two networks at once, chained as gen_img applies them: v1_ours_float at 1.0 then
    v1_kohya_conv at -0.5 ("v1_pair.m1.*").
 5. the `lora` tool's merge / svd merge / resize / extract outputs (commands in
    compat_tools.txt) are loaded by kohya's merge_lora.py (merge_to_sd_model, merge_lora_models),
    svd_merge_lora.py (merge_lora_models) and resize_lora.py (load_state_dict +
    resize_lora_model); what they read is recorded in compat_tools.json, the files are committed,
    and the C test re-runs the tool and checks the bytes.

torch 1.13's CPU baddbmm(beta=0) reads uninitialised memory (NaN now and then) in diffusers
0.10.2's attention: replaced by make_sd_reference_outputs.baddbmm_beta0_zeroed as there; one
thread, float32.
"""
import argparse, hashlib, json, os, shlex, subprocess, sys, types

import torch
from safetensors.torch import save_file, load_file, save as st_save

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DATA = os.path.join(ROOT, "tests", "data")
OUT = os.path.join(DATA, "compat")

OURS = ["v1_ours_float", "v1_ours_fp16", "v1_ours_bf16", "v1_ours_conv",
        "v2_ours_float", "v2_ours_fp16", "v2_ours_bf16", "v2_ours_conv"]

# output file, then the lora tool's arguments (@DATA@ = tests/data, @OUT@ = the output path,
# @TMP@ = the folder of outputs; outputs named tmp_* are intermediates, not committed)
TOOLS = [
    ("tool_lmerge.safetensors",
     "merge --models @DATA@/compat/v1_ours_float.safetensors @DATA@/compat/v1_ours_bf16.safetensors "
     "--ratios 1.0 0.5 --save_to @OUT@"),
    ("tool_svdmerge.safetensors",
     "merge --models @DATA@/compat/v1_ours_float.safetensors @DATA@/compat/v1_ours_conv.safetensors "
     "--ratios 0.7 -0.3 --new_rank 2 --new_conv_rank 1 --save_precision fp16 --save_to @OUT@"),
    ("tool_resize.safetensors",
     "resize --model @DATA@/compat/v1_ours_fp16.safetensors --new_rank 1 --save_precision fp16 --save_to @OUT@"),
    ("tmp_merged_model.safetensors",
     "merge --sd_model @DATA@/sd/v1_ldm.safetensors --models @DATA@/compat/v1_ours_conv.safetensors "
     "--ratios 1.0 --save_to @OUT@"),
    ("tool_extract.safetensors",
     "extract --model_org @DATA@/sd/v1_ldm.safetensors --model_tuned @TMP@/tmp_merged_model.safetensors "
     "--dim 2 --conv_dim 1 --save_precision fp16 --save_to @OUT@"),
]


def precalculate_hashes(state_dict, metadata):
    # spec 9.2 (lora.py's save_weights only needs this function from train_util)
    meta = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = st_save(state_dict, meta)
    n = int.from_bytes(b[:8], "little")
    return hashlib.sha256(b[8 + n:]).hexdigest(), hashlib.sha256(b[0x100000:0x110000]).hexdigest()[:8]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kohya", required=True)
    ap.add_argument("--build", default=os.path.join(ROOT, "build-compat"))
    a = ap.parse_args()
    build = os.path.abspath(a.build)

    lib = types.ModuleType("library")
    lib.__path__ = [os.path.join(a.kohya, "library")]
    tu = types.ModuleType("library.train_util")
    tu.precalculate_safetensors_hashes = precalculate_hashes
    mu = types.ModuleType("library.model_util")
    mu.is_safetensors = lambda p: os.path.splitext(p)[1].lower() == ".safetensors"
    lib.train_util = tu
    lib.model_util = mu
    sys.modules["library"] = lib
    sys.modules["library.train_util"] = tu
    sys.modules["library.model_util"] = mu
    sys.path.insert(0, os.path.join(a.kohya, "networks"))
    sys.path.insert(0, a.kohya)
    import lora, merge_lora, svd_merge_lora, resize_lora
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    sys.path.insert(0, HERE)
    import make_sd_reference_outputs as sdref
    torch.baddbmm = sdref.baddbmm_beta0_zeroed
    torch.set_num_threads(1)

    base_unet = list(lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE)
    conv_unet = base_unet + list(lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE_CONV2D_3X3)
    os.makedirs(OUT, exist_ok=True)

    # 1. our files
    subprocess.run([os.path.join(build, "tests", "parity", "test_compat"), "--write", OUT], check=True,
                   env=dict(os.environ, LORA_TEST_DATA=DATA))

    def load(v):
        d = os.path.join(DATA, "sd", f"v{v}_diffusers")
        unet = UNet2DConditionModel.from_pretrained(d, subfolder="unet").float().eval()
        te = CLIPTextModel.from_pretrained(d, subfolder="text_encoder").float().eval()
        return te, unet

    ref = {}
    inputs = {}
    for v in (1, 2):
        te, unet = load(v)
        g = torch.Generator().manual_seed(40 + v)
        lat = torch.randn(1, 4, 8, 8, generator=g)
        ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
        t = torch.tensor([437.0])
        ids = torch.randint(0, te.config.vocab_size, (1, 16), generator=g)
        inputs[v] = (lat, t, ctx, ids)
        ref[f"v{v}.latent"], ref[f"v{v}.timestep"], ref[f"v{v}.context"], ref[f"v{v}.ids"] = lat, t, ctx, ids

    def outputs(v, te, unet):
        lat, t, ctx, ids = inputs[v]
        with torch.no_grad():
            u = unet(lat, t, encoder_hidden_states=ctx).sample
            h = te(ids)[0]
        return u.detach().clone(), h.detach().clone()

    for v in (1, 2):
        te, unet = load(v)
        ref[f"v{v}.base.unet"], ref[f"v{v}.base.te"] = outputs(v, te, unet)

    def apply_files(v, key, files_mults, half=True, make=None):
        te, unet = load(v)
        nets = []
        for f, m in files_mults:
            lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(base_unet)   # kohya mutates it in place
            if make is None:
                net = lora.create_network_from_weights(m, os.path.join(DATA, f), None, te, unet)
                net.apply_to(te, unet)
            else:
                net = make(m, te, unet)
            ref["count." + f] = torch.tensor(len(net.text_encoder_loras) + len(net.unet_loras), dtype=torch.int64)
            nets.append((net, m))
        lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(base_unet)
        ref[key + ".m1.unet"], ref[key + ".m1.te"] = outputs(v, te, unet)
        if half:
            for net, m in nets:
                net.set_multiplier(0.5 * m)
            ref[key + ".m0.5.unet"], ref[key + ".m0.5.te"] = outputs(v, te, unet)
        a, b = ref[key + ".m1.unet"].double(), ref[f"v{v}.base.unet"].double()
        d = float(((a - b) ** 2).sum().sqrt() / (b ** 2).sum().sqrt())
        assert not torch.isnan(ref[key + ".m1.unet"]).any() and not torch.isnan(ref[key + ".m1.te"]).any(), (key, torch.isnan(ref[f"v{v}.base.unet"]).any())
        print(f"{key}: {[len(n.text_encoder_loras) + len(n.unet_loras) for n, _ in nets]} modules, "
              f"U-Net output moved by {d:.3f} (relative)")

    # 2. our files through kohya's loader
    for stem in OURS:
        apply_files(int(stem[1]), stem, [(f"compat/{stem}.safetensors", 1.0)])

    # 3. kohya's files
    meta = {"ss_network_module": "networks.lora", "ss_output_name": "compat"}
    kcases = [  # name, version, dim, alpha, extra kwargs, save dtype
        ("v1_kohya_float", 1, 2, 1.0, {}, torch.float),
        ("v1_kohya_fp16", 1, 1, 0.5, {}, torch.float16),
        ("v1_kohya_noalpha", 1, 1, 1.0, {}, torch.float),
        ("v1_kohya_conv", 1, 1, 1.0, {"conv_dim": "1", "conv_alpha": "0.5"}, torch.float16),
        ("v2_kohya_float", 2, 1, 1.0, {}, torch.float),
        ("v2_kohya_fp16", 2, 2, 4.0, {}, torch.float16),
    ]
    facts = {}
    for name, v, dim, alpha, kw, dt in kcases:
        te, unet = load(v)
        lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(base_unet)
        torch.manual_seed(300 + v)
        net = lora.create_network(1.0, dim, alpha, None, te, unet, **kw)
        net.apply_to(te, unet, True, True)   # registers the modules (state_dict, save_weights)
        lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(base_unet)
        g = torch.Generator().manual_seed(500 + len(name) + dim)
        with torch.no_grad():
            for k, p in sorted(net.state_dict().items()):
                if k.endswith(".weight"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        path = os.path.join(OUT, name + ".safetensors")
        m = dict(meta, ss_network_dim=str(dim), ss_network_alpha=str(alpha))
        if name.endswith("noalpha"):
            sd = {k: t.detach().clone().contiguous() for k, t in net.state_dict().items() if not k.endswith(".alpha")}
            save_file(sd, path)
        else:
            net.save_weights(path, dt, m)
        f = f"compat/{name}.safetensors"
        if name.endswith("noalpha"):
            try:
                lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(base_unet)
                te2, unet2 = load(v)
                lora.create_network_from_weights(1.0, path, None, te2, unet2)
                facts["kohya_loads_file_without_alpha"] = "yes"
            except TypeError as e:
                facts["kohya_loads_file_without_alpha"] = f"no: TypeError: {e}"

            def make(mult, te, unet, path=path, dim=dim):
                n = lora.create_network(mult, dim, dim, None, te, unet)   # alpha = dim: scale 1
                n.apply_to(te, unet, True, True)
                n.load_state_dict(load_file(path), False)
                return n
            apply_files(v, name, [(f, 1.0)], make=make)
        else:
            apply_files(v, name, [(f, 1.0)])

    # 4. two networks
    apply_files(1, "v1_pair", [("compat/v1_ours_float.safetensors", 1.0), ("compat/v1_kohya_conv.safetensors", -0.5)],
                half=False)

    save_file({k: t.contiguous() for k, t in sorted(ref.items())}, os.path.join(OUT, "reference.safetensors"))

    # 5. the lora tool's outputs, read by kohya's scripts
    tool = os.path.join(build, "tools", "lora")
    tools = {}
    with open(os.path.join(OUT, "compat_tools.txt"), "w") as fo:
        fo.write("# <output> <lora tool arguments>: written by make_compat_fixtures.py, re-run by test_compat\n")
        for out, args in TOOLS:
            fo.write(f"{out} {args}\n")
            dst = os.path.join(OUT if not out.startswith("tmp_") else "/tmp", out)
            cmd = args.replace("@DATA@", DATA).replace("@OUT@", dst).replace("@TMP@", "/tmp")
            subprocess.run([tool] + shlex.split(cmd), check=True)
            if out.startswith("tmp_"):
                continue
            rec = {"command": "lora " + args}
            sd = load_file(dst)
            rec["tensors"] = len(sd)
            rec["dtypes"] = sorted({str(t.dtype) for t in sd.values()})
            # merge_lora.merge_to_sd_model: every module must find its target
            te, unet = load(1)
            lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(conv_unet)
            te0 = {k: t.clone() for k, t in te.state_dict().items()}
            un0 = {k: t.clone() for k, t in unet.state_dict().items()}
            import io, contextlib
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                merge_lora.merge_to_sd_model(te, unet, [dst], [1.0], torch.float)
            lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(base_unet)
            assert "no module found" not in buf.getvalue(), buf.getvalue()
            changed = sum(int(not torch.equal(te0[k], t)) for k, t in te.state_dict().items()) + \
                sum(int(not torch.equal(un0[k], t)) for k, t in unet.state_dict().items())
            rec["merge_to_sd_model_weights_changed"] = changed
            rec["modules"] = sum(1 for k in sd if k.endswith(".lora_down.weight"))
            # merge_lora.merge_lora_models (same file twice: ranks agree)
            with contextlib.redirect_stdout(io.StringIO()):
                mm = merge_lora.merge_lora_models([dst, dst], [0.5, 0.5], torch.float)
            rec["merge_lora_models_tensors"] = len(mm)
            # svd_merge_lora.merge_lora_models
            with contextlib.redirect_stdout(io.StringIO()):
                lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(base_unet)
                sm = svd_merge_lora.merge_lora_models([dst], [1.0], 1, 1, None, torch.float)
            rec["svd_merge_tensors"] = len(sm)
            # resize_lora
            rs, _ = resize_lora.load_state_dict(dst, torch.float)
            with contextlib.redirect_stdout(io.StringIO()):
                o, _, _ = resize_lora.resize_lora_model(dict(rs), 1, torch.float, "cpu", None, None, False)
            rec["resize_tensors"] = len(o)
            rec["sum_abs_delta_after_merge"] = float(sum((te.state_dict()[k] - te0[k]).abs().sum() for k in te0) +
                                                     sum((unet.state_dict()[k] - un0[k]).abs().sum() for k in un0))
            tools[out] = rec
            print(out, rec)
    facts["tools"] = tools
    facts["versions"] = {"torch": torch.__version__, "kohya": "75d1883da630c033841ff7fc79a94ca7131dd3d3"}
    with open(os.path.join(OUT, "compat_tools.json"), "w") as fo:
        json.dump(facts, fo, indent=1, sort_keys=True)
        fo.write("\n")
    for f in sorted(os.listdir(OUT)):
        print(f, os.path.getsize(os.path.join(OUT, f)))


if __name__ == "__main__":
    main()
