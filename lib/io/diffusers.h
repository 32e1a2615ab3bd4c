/* Diffusers folders (model_index.json + unet/ vae/ text_encoder/ scheduler/). */
#ifndef LORA_IO_DIFFUSERS_H
#define LORA_IO_DIFFUSERS_H

#include "model/sd_model.h"

/* 1 when `path` is a folder holding model_index.json. */
int diffusers_is_folder(const char *path);
/* Loads configs and weights (.safetensors preferred, else .bin) into `m` (tensor maps must be
 * initialised and empty). .safetensors weights are mapped and borrowed: keep[0..2] receive the
 * open files (or NULL), which the caller closes with st_close after clearing the maps, on
 * failure too. A missing component -> LORA_E_NOT_FOUND naming it. */
lora_status diffusers_load(lora_ctx *ctx, const char *dir, struct sd_model *m, struct lora_file *keep[3]);
/* Writes a diffusers folder; `safetensors` 1 for .safetensors weights, 0 for .bin. The folder
 * must not exist or be empty; it appears complete or not at all. */
lora_status diffusers_save(lora_ctx *ctx, const char *dir, const struct sd_model *m, int safetensors);

#endif
