#!/bin/sh
# The main job on built-in data: installs what is missing, builds liblora and the `lora`
# command, writes a small kohya-format LoRA file (the shapes train_network.py produces for
# SD v1 attention layers, rank 4, alpha 1) and inspects it with `lora info`.
# Training (issue 7) will replace the hand-written file with a real training run.
set -eu
cd "$(dirname "$0")/.."
sh scripts/deps.sh
[ -f build-demo/build.ninja ] || meson setup build-demo -Dcuda=disabled -Dtests=false -Dexamples=true >/dev/null
ninja -C build-demo >/dev/null
out=build-demo/demo
mkdir -p "$out"
python3 - "$out/demo_lora.safetensors" <<'PY'
import json, random, struct, sys
random.seed(0)
rank, alpha = 4, 1.0
modules = [  # kohya names and (in, out) features of SD v1 layers
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320, 320),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 768, 320),
    ("lora_unet_mid_block_attentions_0_proj_in", 1280, 1280),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", 768, 3072),
]
tensors = {}
for name, fin, fout in modules:
    tensors[name + ".lora_down.weight"] = ([rank, fin], [random.gauss(0, 0.01) for _ in range(rank * fin)])
    tensors[name + ".lora_up.weight"] = ([fout, rank], [0.0] * (fout * rank))
    tensors[name + ".alpha"] = ([], [alpha])
header = {"__metadata__": {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                           "ss_network_alpha": str(alpha), "ss_base_model_version": "sd_v1"}}
off, blobs = 0, []
for name in sorted(tensors):
    shape, vals = tensors[name]
    blob = struct.pack("<%df" % len(vals), *vals)
    header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(blob)]}
    off += len(blob)
    blobs.append(blob)
h = json.dumps(header, separators=(",", ":")).encode()
h += b" " * (-len(h) % 8)
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
PY
echo "== lora version"
build-demo/tools/lora version
echo "== lora info $out/demo_lora.safetensors"
build-demo/tools/lora info "$out/demo_lora.safetensors"
echo "== lora info --json (first lines)"
build-demo/tools/lora info --json "$out/demo_lora.safetensors" | head -n 12
