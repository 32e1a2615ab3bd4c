/* LDM (CompVis / kohya single-file checkpoint) <-> diffusers key names for SD v1/v2:
 * spec/kohya-lora.md §3. The U-Net, VAE and text encoder move between one flat LDM state dict
 * (prefixes model.diffusion_model., first_stage_model., cond_stage_model.transformer. (v1) /
 * cond_stage_model.model. (v2, OpenCLIP)) and the three diffusers-named maps of an sd_model.
 *
 * The layout (number of levels, resnets per level, which levels have attention, where the
 * upsamplers sit) is read from the key names, never assumed, so the maps work for SD's
 * 320/640/1280/1280 U-Net and for the tiny test models alike. */
#ifndef LORA_IO_KEYMAP_H
#define LORA_IO_KEYMAP_H

#include "model/sd_model.h"

/* Moves the tensors of `ldm` into `out` under diffusers names and fills out->cfg from their
 * shapes. `out` is (re)initialised here (its previous contents are not freed).
 *   - VAE mid-block attention q/k/v/proj_out weights [C,C,1,1] become [C,C] (same bytes);
 *   - v2 attn.in_proj_weight [3H,H] / in_proj_bias [3H] are split into q/k/v copies, and
 *     text_model.embeddings.position_ids (int64 [1,P], 0..P-1) is synthesised as
 *     transformers has it; the last OpenCLIP resblock (SD2 conditions on the penultimate
 *     layer), text_projection and logit_scale have no diffusers name;
 *   - v1 checkpoints without the `text_model.` level are accepted (normalised to it);
 *   - every key without a diffusers name (EMA, DDPM buffers, the above) goes to out->extra
 *     under its LDM name: nothing is dropped.
 * cfg: version (2 when cond_stage_model.model.* exists), channels, levels, attention levels,
 * context dim (attn2.to_k), use_linear_projection (rank of proj_in), text encoder sizes, VAE
 * sizes. Values the weights do not hold are set by SD's rules only when the shapes fit them,
 * else left 0 for a config to supply: heads (v1: 8 per level, v2: C/64, when C % 64 == 0),
 * te_heads (hidden/64 when hidden % 64 == 0), norm groups (32 when every width is a multiple
 * of 32); v_prediction is 0.
 * Errors (the message names the LDM key): a missing essential tensor -> LORA_E_NOT_A_MODEL;
 * a tensor whose rank/shape cannot be what its name says -> LORA_E_SHAPE_MISMATCH; a layout
 * the maps cannot follow -> LORA_E_UNSUPPORTED_LAYOUT; LORA_E_NOMEM.
 * On success `ldm` is left empty (its tensors, and the ownership of their data, are in out).
 * On failure `ldm` is unchanged and `out` is empty. */
lora_status sd_from_ldm(lora_ctx *ctx, struct tensor_map *ldm, struct sd_model *out);

/* The reverse: `out` (initialised here on m->ctx) gets the LDM state dict, bit-exact: the
 * same names, shapes, dtypes and bytes as the file sd_from_ldm read (extra included). The
 * layout comes from m's key names; m->cfg.version selects the text encoder form (2:
 * OpenCLIP). `out` borrows m's data, except the concatenated v2 in_proj tensors, which it
 * owns: keep `m` alive while `out` is used.
 * Normalised on the way (as kohya does): v1 text encoders are written with the `text_model.`
 * level; v2's position_ids is not written (OpenCLIP has none). A v2 model that did not come
 * from an LDM file (no cond_stage_model.model.* in m->extra, e.g. a diffusers folder) gets
 * what SD2's OpenCLIP has beyond the used layers, made up as kohya's converter does: the last
 * resblock as a copy of the last used layer, text_projection = ones [H,H], logit_scale = 1
 * (in the text encoder's dtype), so that sd_from_ldm of the result gives the same layers.
 * Errors: a tensor with no LDM name, or a v2 q_proj without its k/v (or shapes that cannot be
 * concatenated) -> LORA_E_UNSUPPORTED_LAYOUT / LORA_E_SHAPE_MISMATCH naming it; an essential
 * tensor missing -> LORA_E_NOT_A_MODEL; a name in m->extra that a mapped tensor also gets ->
 * LORA_E_INVALID_ARG. On failure `out` is empty. */
lora_status sd_to_ldm(const struct sd_model *m, struct tensor_map *out);

/* ---- the U-Net index arithmetic, exposed for tests ----------------------------------------
 * LDM numbers the U-Net's blocks flatly: input_blocks.0 is conv_in, then per level i the
 * `layers` resnets (with their attention as sub-module .1) and, except on the last level, the
 * downsampler; output_blocks per level i: layers+1 resnets (attention .1), the upsampler at
 * the last of them, as sub-module .1 (no attention) or .2. */
static inline int32_t sd_ldm_input_block(int32_t level, int32_t j, int32_t layers) {
    return (layers + 1) * level + j + 1;
}
static inline int32_t sd_ldm_downsampler_block(int32_t level, int32_t layers) { return (layers + 1) * (level + 1); }
static inline int32_t sd_ldm_output_block(int32_t up_level, int32_t j, int32_t layers) {
    return (layers + 1) * up_level + j;
}
static inline int32_t sd_ldm_upsampler_block(int32_t up_level, int32_t layers) {
    return (layers + 1) * up_level + layers;
}
static inline int32_t sd_ldm_upsampler_sub(int32_t up_has_attention) { return up_has_attention ? 2 : 1; }

/* A U-Net layout, as read from either naming. up levels count from the deepest (diffusers
 * up_blocks order). */
struct sd_unet_layout {
    int32_t n_levels;
    int32_t layers;                       /* resnets per down block (up blocks have one more) */
    int32_t down_attn[SD_MAX_LEVELS];
    int32_t up_attn[SD_MAX_LEVELS];
    int32_t up_sub[SD_MAX_LEVELS];        /* sub-module index of the upsampler (1 or 2) */
    int32_t mid_attn;
};

/* SD 1.x/2.x: 4 levels, 2 resnets, attention on levels 0-2 (up 1-3). */
void sd_unet_layout_sd(struct sd_unet_layout *l);

/* One U-Net key, without the "model.diffusion_model." prefix, in the given layout.
 * `to_ldm` 1: diffusers -> LDM, 0: LDM -> diffusers. LORA_OK with the name in buf;
 * LORA_E_NO_MATCHING_KEYS (no message) when the key has no counterpart; LORA_E_LIMIT when buf
 * is too small; LORA_E_NOMEM. */
lora_status sd_unet_key_map(lora_ctx *ctx, const struct sd_unet_layout *l, int to_ldm, const char *key,
                            char *buf, size_t cap);

#endif
