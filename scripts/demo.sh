#!/bin/sh
# The main job on built-in data: installs what is missing, builds liblora and the `lora`
# command, writes a small synthetic dataset (coloured circles and squares with captions,
# DreamBooth folder layout), trains a LoRA on the tiny SD-structured v1 model committed in
# tests/data/sd on the CPU (about a minute), prints the loss curve, saves the LoRA with kohya's
# metadata and inspects it with `lora info`, then generates PNGs without the LoRA, with it at
# run time and merged into the weights, and merges it into a copy of the model file.
set -eu
cd "$(dirname "$0")/.."
sh scripts/deps.sh
[ -f build-demo/build.ninja ] || meson setup build-demo -Dcuda=disabled -Dtests=false -Dexamples=true >/dev/null
ninja -C build-demo >/dev/null
out=build-demo/demo
rm -rf "$out"
mkdir -p "$out"
echo "== lora version"
build-demo/tools/lora version
echo "== synthetic dataset"
build-demo/tools/lora demo-images "$out/data" --count 12 --size 64 --repeats 5
echo "== lora train (tiny SD v1 model, 64x64, rank 8, 1500 steps)"
build-demo/tools/lora train \
    --pretrained_model_name_or_path tests/data/sd/v1_diffusers \
    --train_data_dir "$out/data" --output_dir "$out/out" --output_name shapes \
    --network_module networks.lora --network_dim 8 --network_alpha 4 \
    --resolution 64 --train_batch_size 1 --max_train_steps 1500 \
    --learning_rate 1e-3 --lr_scheduler cosine --lr_warmup_steps 50 \
    --optimizer_type AdamW --cache_latents --seed 1 \
    --save_every_n_epochs 10 --save_model_as safetensors --training_comment "liblora demo"
echo "== lora info $out/out/shapes.safetensors"
build-demo/tools/lora info "$out/out/shapes.safetensors" | head -n 24
model=tests/data/sd/v1_diffusers
gen="build-demo/tools/lora generate --ckpt $model --W 64 --H 64 --steps 20 --sampler ddim --scale 7.5 --seed 42 --images_per_prompt 2"
prompt="a red circle on a light background --n blurry"
echo "== lora generate: without the LoRA -> $out/gen/base"
$gen --outdir "$out/gen/base" --prompt "$prompt"
echo "== lora generate: with the LoRA at multiplier 1 -> $out/gen/lora"
$gen --outdir "$out/gen/lora" --prompt "$prompt" \
    --network_module networks.lora --network_weights "$out/out/shapes.safetensors" --network_mul 1.0
echo "== lora generate: the LoRA merged into the weights (--network_merge) -> $out/gen/merged"
$gen --outdir "$out/gen/merged" --prompt "$prompt" --network_merge \
    --network_module networks.lora --network_weights "$out/out/shapes.safetensors" --network_mul 1.0
echo "== lora merge: the LoRA into a copy of the model file -> $out/merged.safetensors"
build-demo/tools/lora merge --sd_model "$model" --models "$out/out/shapes.safetensors" --ratios 1.0 \
    --save_to "$out/merged.safetensors"
build-demo/tools/lora info "$out/merged.safetensors" | head -n 6
ls "$out"/gen/*/*.png
