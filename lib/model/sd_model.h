/* A Stable Diffusion v1/v2 checkpoint in memory: the three networks as diffusers-shaped state
 * dicts (the names diffusers 0.10.2 / transformers 4.25.1 use), plus what the LDM file held
 * that has no diffusers name, kept verbatim so a save loses nothing. Every loader (LDM
 * .safetensors/.ckpt, diffusers folder) produces this; every writer consumes it. */
#ifndef LORA_MODEL_SD_MODEL_H
#define LORA_MODEL_SD_MODEL_H

#include "io/tensor_map.h"

#define SD_MAX_LEVELS 8

/* Architecture read from the weights (lib/model/sd_config.c). */
struct sd_config {
    int32_t version;                /* 1 or 2 (0 = unknown) */
    int32_t v_prediction;           /* 1: v-parameterization */
    /* U-Net */
    int32_t unet_in_channels;       /* 4 (9 for inpainting) */
    int32_t unet_out_channels;
    int32_t n_levels;               /* down blocks */
    int32_t block_channels[SD_MAX_LEVELS];
    int32_t layers_per_block;
    int32_t attn_levels[SD_MAX_LEVELS];   /* 1 when level i has attentions (CrossAttnDownBlock2D) */
    int32_t heads[SD_MAX_LEVELS];         /* attention heads per level */
    int32_t context_dim;            /* 768 (v1) / 1024 (v2) */
    int32_t use_linear_projection;  /* proj_in/proj_out are Linear (2-D) rather than 1x1 conv */
    int32_t unet_norm_groups;       /* GroupNorm groups: not in the weights; 32 in SD */
    /* text encoder */
    int32_t te_layers, te_hidden, te_heads, te_intermediate, te_max_positions, te_vocab;
    int32_t te_gelu;                /* 1: exact gelu (OpenCLIP, v2); 0: quick_gelu (CLIP-L, v1) */
    /* VAE */
    int32_t vae_latent_channels;    /* 4 */
    int32_t vae_n_levels;
    int32_t vae_block_channels[SD_MAX_LEVELS];
    int32_t vae_layers_per_block;
    int32_t vae_norm_groups;        /* 32 in SD */
};

struct sd_model {
    lora_ctx *ctx;
    struct sd_config cfg;
    struct tensor_map unet;    /* "conv_in.weight", "down_blocks.0.resnets.0.norm1.weight", ... */
    struct tensor_map vae;     /* "encoder.conv_in.weight", ... (diffusers 0.10 VAE names) */
    struct tensor_map te;      /* "text_model.embeddings.token_embedding.weight", ... */
    struct tensor_map extra;   /* LDM-named tensors without a diffusers name (EMA, DDPM
                                * buffers, v2 text_projection / logit_scale / last block) */
    /* read-only file mappings borrowed tensors may point into (set by the loader; see
     * sd_release_borrowed) */
    struct { const void *base; uint64_t size; } mapped[4];
    int32_t n_mapped;
};

/* A borrowed tensor at [data, data + nbytes) was just replaced by an owned copy (a merge):
 * when it lies in one of m->mapped, its whole pages leave this process's resident set
 * (MADV_DONTNEED on a private read-only file mapping: the page cache keeps them, and a later
 * read, e.g. by a U-Net still borrowing them, faults them in again from the file). Without
 * it, merging a LoRA into a mapped fp16 model keeps both the file pages and the merged copy
 * resident (+0.7 GB for SD1.5 with a LoRA on every module). Anything else: no effect. */
void sd_release_borrowed(const struct sd_model *m, const void *data, uint64_t nbytes);

/* The public lora_model handle (lib/api/model.c). */
#define LORA_MODEL_MAGIC 0x4d4f444cu /* "MODL" */
struct lora_model {
    uint32_t magic;
    lora_ctx *ctx;
    lora_format format;
    struct sd_model sd;
    struct lora_file *backing[3];   /* mapped .safetensors files that borrowed tensors point into */
    void *ckpt_map;              /* or the mapped .ckpt (see ckpt_read_mapped) */
    uint64_t ckpt_map_size;
    struct clip_model *te_run;   /* text encoder ready to run, built on first encode_prompt */
    lora_tokenizer *tokenizer;   /* likewise */
    struct model_unet_run *unet_run;   /* fp32 U-Net + a plan for the last shape (unet_predict) */
    struct model_vae_run *vae_run;     /* fp32 VAE + a plan for the last shape (vae_encode/decode) */
    /* LoRA networks attached at run time and the base weights they replaced
     * (lib/network/attach.c; NULL until the first lora_model_attach). */
    struct model_attach *attach;
};

/* Drops the cached fp32 U-Net / VAE (lora_model_unet_predict, lora_model_vae_*): call it after
 * changing the model's weights, as for te_run. */
void model_drop_image_runs(struct lora_model *m);
/* Drops the text-encoder and image runs: every cached network built from the weights. */
void model_drop_runs(struct lora_model *m);
/* Model teardown for runtime-attached LoRA networks (lib/network/attach.c): the original
 * tensors go back into the maps and the networks are released. NULL attach: no-op. */
void attach_release(struct lora_model *m);

/* Makes m->tokenizer (the model's SD1/SD2 CLIP tokenizer) on first use. */
lora_status model_tokenizer_ready(struct lora_model *m);
/* Makes m->tokenizer and m->te_run (the fp32 text encoder) on first use; LORA_E_UNSUPPORTED
 * (message starting with `who`) when the encoder's head count is unknown. */
lora_status model_text_encoder_ready(struct lora_model *m, const char *who);

void sd_model_init(struct sd_model *m, lora_ctx *ctx);
void sd_model_clear(struct sd_model *m);

#endif
