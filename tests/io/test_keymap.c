/* LDM <-> diffusers key maps (lib/io/keymap.c) against the tiny SD v1/v2 checkpoints that
 * tests/reference/make_sd_fixtures.py builds with diffusers 0.10.2 / transformers 4.25.1:
 *   - sd_from_ldm on tests/data/sd/vN_ldm.safetensors gives exactly the tensors of the
 *     diffusers folder's .safetensors files (names, dtypes, shapes, bytes);
 *   - the LDM -> diffusers mapping equals the one the fixture script computed
 *     (expected_keys_vN.json), tensor bytes included;
 *   - cfg agrees with the folder's config.json files (where the weights can tell);
 *   - the .ckpt copy (read by ckpt_read) gives the same model;
 *   - sd_to_ldm gives back the LDM file key for key, byte for byte, and st_write of it
 *     reproduces the Python-written file exactly;
 *   - sd_to_ldm of the diffusers folder's own tensors gives the script's LDM tensors (v2: with
 *     kohya's made-up last resblock / text_projection / logit_scale) and reads back the same;
 * plus the U-Net index arithmetic on SD's own layout (from spec §2.1/§3.1, written out here)
 * and the error cases. */
#include <unistd.h>

#include <jansson.h>

#include "core/dtype.h"
#include "io/ckpt.h"
#include "io/keymap.h"
#include "io/safetensors.h"
#include "../test.h"

static char tmpdir[64];

static const char *data_dir(void) {
    const char *d = getenv("LORA_TEST_DATA");
    return d ? d : "tests/data";
}

static char *sd_path(const char *rel) {
    char *d = test_path_join(data_dir(), "sd");
    char *p = test_path_join(d, rel);
    free(d);
    return p;
}

/* Copies every tensor of a safetensors file into `m` (owned). */
static int load_st(lora_ctx *ctx, const char *path, struct tensor_map *m) {
    struct lora_file *f = NULL;
    if (st_open(ctx, path, &f) != LORA_OK) {
        fprintf(stderr, "cannot open %s: %s (run tests/reference/make_sd_fixtures.py)\n", path, lora_errmsg(ctx));
        return 0;
    }
    tmap_init(m, ctx);
    int ok = 1;
    for (int64_t i = 0; i < f->n_tensors && ok; i++) {
        const struct st_tensor *t = &f->tensors[i];
        ok = tmap_add(m, t->name, t->dtype, t->ndim, t->shape, st_data(f, i), t->end - t->begin, 1, 1) == LORA_OK;
    }
    st_close(f);
    return ok;
}

static int same_tensor(const struct lora_tensor *a, const struct lora_tensor *b) {
    return a->dtype == b->dtype && a->ndim == b->ndim && memcmp(a->shape, b->shape, (size_t)a->ndim * 8) == 0 &&
           a->nbytes == b->nbytes && memcmp(a->data, b->data, (size_t)a->nbytes) == 0;
}

/* Every tensor of `want` is in `got` with the same dtype, shape and bytes, and nothing else. */
static void check_same_map(const char *what, const struct tensor_map *got, const struct tensor_map *want) {
    int bad = 0;
    for (int64_t i = 0; i < want->n; i++) {
        int64_t j = tmap_find(got, want->t[i].name);
        if (j < 0) {
            if (bad++ < 5) fprintf(stderr, "%s: %s missing\n", what, want->t[i].name);
        } else if (!same_tensor(&got->t[j], &want->t[i])) {
            if (bad++ < 5) fprintf(stderr, "%s: %s differs\n", what, want->t[i].name);
        }
    }
    CHECK_MSG(bad == 0, "%s: %d tensors missing or different", what, bad);
    CHECK_MSG(got->n == want->n, "%s: %lld tensors, want %lld", what, (long long)got->n, (long long)want->n);
}

static struct tensor_map *comp(struct sd_model *m, const char *c) {
    return strcmp(c, "unet") == 0 ? &m->unet : strcmp(c, "vae") == 0 ? &m->vae : strcmp(c, "te") == 0 ? &m->te
                                                                                                         : &m->extra;
}

static int64_t jint(json_t *o, const char *k) { return json_integer_value(json_object_get(o, k)); }

static json_t *load_json(const char *rel) {
    char *p = sd_path(rel);
    json_error_t e;
    json_t *j = json_load_file(p, 0, &e);
    if (!j) fprintf(stderr, "%s: %s\n", p, e.text);
    free(p);
    return j;
}

/* cfg against the diffusers config.json files: every value the weights hold. */
static void check_cfg(const char *ver, const struct sd_config *c) {
    char rel[128];
    snprintf(rel, sizeof rel, "%s_diffusers/unet/config.json", ver);
    json_t *u = load_json(rel);
    snprintf(rel, sizeof rel, "%s_diffusers/vae/config.json", ver);
    json_t *v = load_json(rel);
    snprintf(rel, sizeof rel, "%s_diffusers/text_encoder/config.json", ver);
    json_t *t = load_json(rel);
    CHECK(u && v && t);
    if (!u || !v || !t) return;
    int v2 = strcmp(ver, "v2") == 0;
    CHECK(c->version == (v2 ? 2 : 1));
    CHECK(c->v_prediction == 0);   /* not in the weights */
    CHECK(c->unet_in_channels == jint(u, "in_channels"));
    CHECK(c->unet_out_channels == jint(u, "out_channels"));
    json_t *bc = json_object_get(u, "block_out_channels"), *dt = json_object_get(u, "down_block_types");
    CHECK(c->n_levels == (int32_t)json_array_size(bc));
    for (size_t i = 0; i < json_array_size(bc); i++) {
        int32_t ch = (int32_t)json_integer_value(json_array_get(bc, i));
        CHECK(c->block_channels[i] == ch);
        CHECK(c->attn_levels[i] == (strncmp(json_string_value(json_array_get(dt, i)), "CrossAttn", 9) == 0));
        /* heads are not in the weights: SD's rule only where it fits (never for these widths) */
        CHECK(c->heads[i] == (ch % 64 == 0 ? (v2 ? ch / 64 : 8) : 0));
    }
    CHECK(c->layers_per_block == jint(u, "layers_per_block"));
    CHECK(c->context_dim == jint(u, "cross_attention_dim"));
    CHECK(c->use_linear_projection == json_is_true(json_object_get(u, "use_linear_projection")));
    CHECK(c->unet_norm_groups == 0);   /* widths 4, 8, 12: not SD's 32 */
    CHECK(c->te_layers == jint(t, "num_hidden_layers"));
    CHECK(c->te_hidden == jint(t, "hidden_size"));
    CHECK(c->te_intermediate == jint(t, "intermediate_size"));
    CHECK(c->te_max_positions == jint(t, "max_position_embeddings"));
    CHECK(c->te_vocab == jint(t, "vocab_size"));
    CHECK(c->te_gelu == (strcmp(json_string_value(json_object_get(t, "hidden_act")), "gelu") == 0));
    CHECK(c->te_heads == (c->te_hidden % 64 == 0 ? c->te_hidden / 64 : 0));
    CHECK(c->te_heads == 0);
    json_t *vb = json_object_get(v, "block_out_channels");
    CHECK(c->vae_n_levels == (int32_t)json_array_size(vb));
    for (size_t i = 0; i < json_array_size(vb); i++)
        CHECK(c->vae_block_channels[i] == json_integer_value(json_array_get(vb, i)));
    CHECK(c->vae_latent_channels == jint(v, "latent_channels"));
    CHECK(c->vae_layers_per_block == jint(v, "layers_per_block"));
    CHECK(c->vae_norm_groups == 0);
    json_decref(u);
    json_decref(v);
    json_decref(t);
}

/* The fixture script's statement of the map, checked against what sd_from_ldm did, bytes
 * included (`ldm` is a second copy of the source file). */
static void check_expected(const char *ver, struct sd_model *m, const struct tensor_map *ldm) {
    char rel[64];
    snprintf(rel, sizeof rel, "expected_keys_%s.json", ver);
    json_t *j = load_json(rel);
    CHECK(j != NULL);
    if (!j) return;
    static const char *const comps[] = {"unet", "vae", "te"};
    for (int c = 0; c < 3; c++) {
        json_t *list = json_object_get(j, comps[c]);
        struct tensor_map *map = comp(m, comps[c]);
        CHECK_MSG((int64_t)json_array_size(list) == map->n, "%s %s: %zu keys listed, %lld mapped", ver, comps[c],
                  json_array_size(list), (long long)map->n);
        int bad = 0;
        size_t i;
        json_t *e;
        json_array_foreach(list, i, e) {
            const char *name = json_string_value(json_array_get(e, 0));
            json_t *shape = json_array_get(e, 1);
            int64_t k = tmap_find(map, name);
            int ok = k >= 0 && map->t[k].ndim == (int32_t)json_array_size(shape);
            for (size_t d = 0; ok && d < json_array_size(shape); d++)
                ok = map->t[k].shape[d] == json_integer_value(json_array_get(shape, d));
            if (!ok && bad++ < 5) fprintf(stderr, "%s %s: %s missing or of another shape\n", ver, comps[c], name);
        }
        CHECK_MSG(bad == 0, "%s %s: %d keys missing or of another shape", ver, comps[c], bad);
    }
    /* LDM key -> diffusers key(s): the C map made the same choice, with the same bytes */
    json_t *map = json_object_get(j, "ldm_to_diffusers");
    CHECK((int64_t)json_object_size(map) == ldm->n);
    const char *key;
    json_t *val;
    int bad = 0, n_extra = 0;
    json_object_foreach(map, key, val) {
        const char *c = json_string_value(json_array_get(val, 0));
        int64_t src = tmap_find(ldm, key);
        if (src < 0) {
            if (bad++ < 5) fprintf(stderr, "%s: %s is not in the LDM file\n", ver, key);
            continue;
        }
        const struct lora_tensor *s = &ldm->t[src];
        struct tensor_map *dst = comp(m, c);
        size_t nn = json_array_size(val) - 1;
        n_extra += strcmp(c, "extra") == 0;
        uint64_t off = 0;
        for (size_t q = 0; q < nn; q++) {
            const char *name = json_string_value(json_array_get(val, q + 1));
            int64_t d = tmap_find(dst, name);
            /* one name: same bytes; three (v2 in_proj): consecutive thirds */
            if (d < 0 || dst->t[d].dtype != s->dtype || off + dst->t[d].nbytes > s->nbytes ||
                memcmp((const uint8_t *)s->data + off, dst->t[d].data, (size_t)dst->t[d].nbytes) != 0) {
                if (bad++ < 5) fprintf(stderr, "%s: %s -> %s %s: missing or other bytes\n", ver, key, c, name);
                break;
            }
            off += dst->t[d].nbytes;
        }
        if (off != s->nbytes && bad++ < 5) fprintf(stderr, "%s: %s: mapped bytes do not cover it\n", ver, key);
    }
    CHECK_MSG(bad == 0, "%s: %d LDM keys mapped otherwise than the fixture script says", ver, bad);
    CHECK(n_extra == m->extra.n);
    CHECK((int64_t)json_array_size(json_object_get(j, "extra")) == m->extra.n);
    json_decref(j);
}

/* Writes `m` with st_write (no metadata) and compares the file with `ref`. */
static void check_file_bytes(lora_ctx *ctx, const struct tensor_map *m, const char *ref) {
    struct st_write_tensor *w = calloc((size_t)m->n, sizeof *w);
    for (int64_t i = 0; i < m->n; i++) {
        w[i].name = m->t[i].name;
        w[i].dtype = m->t[i].dtype;
        w[i].ndim = m->t[i].ndim;
        w[i].shape = m->t[i].shape;
        w[i].data = m->t[i].data;
    }
    char *out = test_path_join(tmpdir, "roundtrip.safetensors");
    CHECK_STATUS(st_write(ctx, out, w, m->n, NULL, NULL, 0), LORA_OK);
    size_t na = 0, nb = 0;
    uint8_t *a = test_slurp(out, &na), *b = test_slurp(ref, &nb);
    CHECK_MSG(a && b && na == nb && memcmp(a, b, na) == 0, "st_write(sd_to_ldm(...)) differs from %s", ref);
    free(a);
    free(b);
    unlink(out);
    free(out);
    free(w);
}

static void check_version(lora_ctx *ctx, const char *ver) {
    char rel[128];
    snprintf(rel, sizeof rel, "%s_ldm.safetensors", ver);
    char *ldm_path = sd_path(rel);
    struct tensor_map ldm, orig;
    if (!load_st(ctx, ldm_path, &ldm) || !load_st(ctx, ldm_path, &orig)) {
        CHECK(0);
        free(ldm_path);
        return;
    }
    struct sd_model m;
    CHECK_STATUS(sd_from_ldm(ctx, &ldm, &m), LORA_OK);
    CHECK(ldm.n == 0);   /* moved */
    CHECK(m.unet.n > 0 && m.vae.n > 0 && m.te.n > 0);

    /* the diffusers folder's weights, as diffusers/transformers saved them */
    static const char *const files[3][2] = {{"unet", "unet/diffusion_pytorch_model.safetensors"},
                                            {"vae", "vae/diffusion_pytorch_model.safetensors"},
                                            {"te", "text_encoder/model.safetensors"}};
    for (int c = 0; c < 3; c++) {
        snprintf(rel, sizeof rel, "%s_diffusers/%s", ver, files[c][1]);
        char *p = sd_path(rel);
        struct tensor_map want;
        if (load_st(ctx, p, &want)) {
            char what[64];
            snprintf(what, sizeof what, "%s %s vs diffusers", ver, files[c][0]);
            check_same_map(what, comp(&m, files[c][0]), &want);
            tmap_clear(&want);
        } else {
            CHECK(0);
        }
        free(p);
    }
    check_expected(ver, &m, &orig);
    check_cfg(ver, &m.cfg);
    if (strcmp(ver, "v2") == 0) {
        CHECK(tmap_find(&m.extra, "cond_stage_model.model.text_projection") >= 0);
        CHECK(tmap_find(&m.extra, "cond_stage_model.model.logit_scale") >= 0);
        CHECK(tmap_find(&m.extra, "cond_stage_model.model.transformer.resblocks.2.ln_1.weight") >= 0);
    }
    CHECK(tmap_find(&m.extra, "alphas_cumprod") >= 0);

    /* the same checkpoint as a torch pickle {'state_dict': ...} reads to the same model */
    snprintf(rel, sizeof rel, "%s_ldm.ckpt", ver);
    char *ck_path = sd_path(rel);
    struct tensor_map ck;
    tmap_init(&ck, ctx);
    CHECK_STATUS(ckpt_read(ctx, ck_path, &ck), LORA_OK);
    check_same_map("ckpt vs safetensors", &ck, &orig);
    struct sd_model mc;
    CHECK_STATUS(sd_from_ldm(ctx, &ck, &mc), LORA_OK);
    check_same_map("ckpt U-Net", &mc.unet, &m.unet);
    check_same_map("ckpt VAE", &mc.vae, &m.vae);
    check_same_map("ckpt text encoder", &mc.te, &m.te);
    check_same_map("ckpt extra", &mc.extra, &m.extra);
    sd_model_clear(&mc);
    tmap_clear(&ck);
    free(ck_path);

    /* and back, bit-exact */
    struct tensor_map back;
    CHECK_STATUS(sd_to_ldm(&m, &back), LORA_OK);
    char what[64];
    snprintf(what, sizeof what, "%s sd_to_ldm vs LDM file", ver);
    check_same_map(what, &back, &orig);
    check_file_bytes(ctx, &back, ldm_path);
    tmap_clear(&back);

    sd_model_clear(&m);
    tmap_clear(&orig);
    free(ldm_path);
}

/* diffusers folder -> sd_to_ldm: the LDM file the fixture script wrote, less what has no
 * diffusers name; v2 gets kohya's made-up last block / projection, and reads back the same. */
static void check_from_diffusers(lora_ctx *ctx, const char *ver) {
    char rel[128];
    int v2 = strcmp(ver, "v2") == 0;
    static const char *const files[3][2] = {{"unet", "unet/diffusion_pytorch_model.safetensors"},
                                            {"vae", "vae/diffusion_pytorch_model.safetensors"},
                                            {"te", "text_encoder/model.safetensors"}};
    struct sd_model m, want;
    sd_model_init(&m, ctx);
    sd_model_init(&want, ctx);
    m.cfg.version = v2 ? 2 : 1;
    int ok = 1;
    for (int c = 0; c < 3; c++) {
        snprintf(rel, sizeof rel, "%s_diffusers/%s", ver, files[c][1]);
        char *p = sd_path(rel);
        ok &= load_st(ctx, p, comp(&m, files[c][0]));
        ok &= load_st(ctx, p, comp(&want, files[c][0]));
        free(p);
    }
    snprintf(rel, sizeof rel, "%s_ldm.safetensors", ver);
    char *lp = sd_path(rel);
    struct tensor_map orig;
    ok &= load_st(ctx, lp, &orig);
    free(lp);
    CHECK(ok);
    if (!ok) return;
    struct tensor_map ldm;
    CHECK_STATUS(sd_to_ldm(&m, &ldm), LORA_OK);
    const char *te2 = "cond_stage_model.model.";
    int bad = 0;
    int64_t n_want = 0;
    for (int64_t i = 0; i < orig.n; i++) {
        const char *n = orig.t[i].name;
        int mapped = strncmp(n, "model.diffusion_model.", 22) == 0 || strncmp(n, "first_stage_model.", 18) == 0 ||
                     strncmp(n, "cond_stage_model.transformer.", 29) == 0 ||
                     (v2 && strncmp(n, te2, strlen(te2)) == 0 && !strstr(n, "resblocks.2.") &&
                      !strstr(n, "text_projection") && !strstr(n, "logit_scale"));
        if (!mapped) continue;
        n_want++;
        int64_t j = tmap_find(&ldm, n);
        if ((j < 0 || !same_tensor(&ldm.t[j], &orig.t[i])) && bad++ < 5)
            fprintf(stderr, "%s diffusers -> LDM: %s missing or different\n", ver, n);
    }
    CHECK_MSG(bad == 0, "%s diffusers -> LDM: %d tensors missing or different", ver, bad);
    /* v2: + the made-up last resblock (12 tensors), text_projection and logit_scale */
    CHECK_MSG(ldm.n == n_want + (v2 ? 14 : 0), "%s diffusers -> LDM: %lld tensors, want %lld", ver, (long long)ldm.n,
              (long long)(n_want + (v2 ? 14 : 0)));
    if (v2) {
        static const char *const blk[] = {"ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
                                          "attn.out_proj.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "ln_2.bias"};
        for (int k = 0; k < (int)(sizeof blk / sizeof blk[0]); k++) {
            char a[256], b[256];
            snprintf(a, sizeof a, "%stransformer.resblocks.2.%s", te2, blk[k]);
            snprintf(b, sizeof b, "%stransformer.resblocks.1.%s", te2, blk[k]);
            int64_t ia = tmap_find(&ldm, a), ib = tmap_find(&orig, b);
            CHECK_MSG(ia >= 0 && ib >= 0 && same_tensor(&ldm.t[ia], &orig.t[ib]), "%s is not a copy of %s", a, b);
        }
        int64_t tp = tmap_find(&ldm, "cond_stage_model.model.text_projection");
        int64_t ls = tmap_find(&ldm, "cond_stage_model.model.logit_scale");
        CHECK(tp >= 0 && ls >= 0);
        if (tp >= 0 && ls >= 0) {
            CHECK(ldm.t[tp].ndim == 2 && ldm.t[tp].shape[0] == 48 && ldm.t[tp].shape[1] == 48);
            CHECK(ldm.t[tp].dtype == LORA_DTYPE_F16 && ldm.t[ls].dtype == LORA_DTYPE_F16 && ldm.t[ls].ndim == 0);
            const uint16_t *h = ldm.t[tp].data;
            int ones = 1;
            for (int64_t k = 0; k < 48 * 48; k++) ones &= h[k] == 0x3c00;
            CHECK(ones && *(const uint16_t *)ldm.t[ls].data == 0x3c00);
        }
    }
    /* and read back: the same diffusers tensors and layer count */
    struct sd_model back;
    CHECK_STATUS(sd_from_ldm(ctx, &ldm, &back), LORA_OK);
    for (int c = 0; c < 3; c++) {
        char what[64];
        snprintf(what, sizeof what, "%s diffusers -> LDM -> diffusers %s", ver, files[c][0]);
        check_same_map(what, comp(&back, files[c][0]), comp(&want, files[c][0]));
    }
    CHECK(back.cfg.te_layers == (v2 ? 2 : 3));
    CHECK(back.extra.n == (v2 ? 14 : 0));
    sd_model_clear(&back);
    tmap_clear(&ldm);
    tmap_clear(&orig);
    sd_model_clear(&m);
    sd_model_clear(&want);
}

/* ---- index arithmetic on SD's own layout (spec §2.1, §2.7, §3.1) ----------------------- */
static void check_pair(lora_ctx *ctx, const struct sd_unet_layout *l, const char *hf, const char *ldm) {
    char buf[256];
    lora_status s = sd_unet_key_map(ctx, l, 1, hf, buf, sizeof buf);
    CHECK_MSG(s == LORA_OK && strcmp(buf, ldm) == 0, "%s -> %s, want %s", hf, s == LORA_OK ? buf : "(none)", ldm);
    s = sd_unet_key_map(ctx, l, 0, ldm, buf, sizeof buf);
    CHECK_MSG(s == LORA_OK && strcmp(buf, hf) == 0, "%s -> %s, want %s", ldm, s == LORA_OK ? buf : "(none)", hf);
}

static void check_unmapped(lora_ctx *ctx, const struct sd_unet_layout *l, int to_ldm, const char *key) {
    char buf[256];
    CHECK_MSG(sd_unet_key_map(ctx, l, to_ldm, key, buf, sizeof buf) == LORA_E_NO_MATCHING_KEYS, "%s mapped to %s", key,
              buf);
}

static void check_index_rules(lora_ctx *ctx) {
    /* input_blocks.{3i+j+1}, downsampler input_blocks.{3(i+1)}.0.op, output_blocks.{3i+j},
     * upsampler output_blocks.{3i+2}.{1 if i == 0 else 2} */
    for (int i = 0; i < 4; i++) {
        for (int j = 0; j < 2; j++) CHECK(sd_ldm_input_block(i, j, 2) == 3 * i + j + 1);
        for (int j = 0; j < 3; j++) CHECK(sd_ldm_output_block(i, j, 2) == 3 * i + j);
        CHECK(sd_ldm_downsampler_block(i, 2) == 3 * (i + 1));
        CHECK(sd_ldm_upsampler_block(i, 2) == 3 * i + 2);
    }
    CHECK(sd_ldm_upsampler_sub(0) == 1 && sd_ldm_upsampler_sub(1) == 2);
    CHECK(sd_ldm_input_block(1, 0, 3) == 5);   /* 3 resnets per level: 1 + 4i + j */

    struct sd_unet_layout l;
    sd_unet_layout_sd(&l);
    check_pair(ctx, &l, "conv_in.weight", "input_blocks.0.0.weight");
    check_pair(ctx, &l, "time_embedding.linear_1.bias", "time_embed.0.bias");
    check_pair(ctx, &l, "time_embedding.linear_2.weight", "time_embed.2.weight");
    check_pair(ctx, &l, "down_blocks.0.resnets.0.norm1.weight", "input_blocks.1.0.in_layers.0.weight");
    check_pair(ctx, &l, "down_blocks.0.resnets.1.conv1.bias", "input_blocks.2.0.in_layers.2.bias");
    check_pair(ctx, &l, "down_blocks.0.attentions.1.proj_in.weight", "input_blocks.2.1.proj_in.weight");
    check_pair(ctx, &l, "down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight");
    check_pair(ctx, &l, "down_blocks.1.resnets.0.conv_shortcut.weight", "input_blocks.4.0.skip_connection.weight");
    check_pair(ctx, &l, "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight",
               "input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight");
    check_pair(ctx, &l, "down_blocks.2.downsamplers.0.conv.bias", "input_blocks.9.0.op.bias");
    check_pair(ctx, &l, "down_blocks.3.resnets.1.time_emb_proj.bias", "input_blocks.11.0.emb_layers.1.bias");
    check_pair(ctx, &l, "mid_block.resnets.0.norm2.weight", "middle_block.0.out_layers.0.weight");
    check_pair(ctx, &l, "mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight",
               "middle_block.1.transformer_blocks.0.ff.net.2.weight");
    check_pair(ctx, &l, "mid_block.resnets.1.conv2.weight", "middle_block.2.out_layers.3.weight");
    check_pair(ctx, &l, "up_blocks.0.resnets.0.conv_shortcut.bias", "output_blocks.0.0.skip_connection.bias");
    check_pair(ctx, &l, "up_blocks.0.resnets.2.conv1.weight", "output_blocks.2.0.in_layers.2.weight");
    check_pair(ctx, &l, "up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight");
    check_pair(ctx, &l, "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
               "output_blocks.3.1.transformer_blocks.0.ff.net.0.proj.weight");
    check_pair(ctx, &l, "up_blocks.1.upsamplers.0.conv.bias", "output_blocks.5.2.conv.bias");
    check_pair(ctx, &l, "up_blocks.2.attentions.2.norm.weight", "output_blocks.8.1.norm.weight");
    check_pair(ctx, &l, "up_blocks.2.upsamplers.0.conv.weight", "output_blocks.8.2.conv.weight");
    check_pair(ctx, &l, "up_blocks.3.attentions.2.proj_out.weight", "output_blocks.11.1.proj_out.weight");
    check_pair(ctx, &l, "up_blocks.3.resnets.2.norm1.bias", "output_blocks.11.0.in_layers.0.bias");
    check_pair(ctx, &l, "conv_norm_out.weight", "out.0.weight");
    check_pair(ctx, &l, "conv_out.bias", "out.2.bias");
    /* what SD does not have */
    check_unmapped(ctx, &l, 1, "up_blocks.3.upsamplers.0.conv.weight");         /* last level: none */
    check_unmapped(ctx, &l, 1, "down_blocks.3.downsamplers.0.conv.weight");
    check_unmapped(ctx, &l, 1, "down_blocks.3.attentions.0.proj_in.weight");    /* DownBlock2D */
    check_unmapped(ctx, &l, 1, "up_blocks.0.attentions.0.proj_in.weight");      /* UpBlock2D */
    check_unmapped(ctx, &l, 1, "down_blocks.0.resnets.0.bogus.weight");
    check_unmapped(ctx, &l, 1, "down_blocks.0.resnets.2.norm1.weight");         /* 2 per down block */
    check_unmapped(ctx, &l, 0, "input_blocks.1.0.in_layers.1.weight");          /* SiLU: no weights */
    check_unmapped(ctx, &l, 0, "input_blocks.12.0.in_layers.0.weight");
    check_unmapped(ctx, &l, 0, "output_blocks.2.2.conv.weight");                /* up 0 has no attention */
    check_unmapped(ctx, &l, 0, "time_embed.1.weight");
    char small[8];
    CHECK_STATUS(sd_unet_key_map(ctx, &l, 1, "conv_in.weight", small, sizeof small), LORA_E_LIMIT);
}

/* ---- error cases ----------------------------------------------------------------------- */
static int64_t find(const struct tensor_map *m, const char *n) { return tmap_find(m, n); }

/* sd_from_ldm must fail with `want`, name `key` in the message, and leave `ldm` as it was. */
static void expect_from_fail(lora_ctx *ctx, struct tensor_map *ldm, lora_status want, const char *key) {
    int64_t n = ldm->n;
    struct sd_model m;
    CHECK_STATUS(sd_from_ldm(ctx, ldm, &m), want);
    CHECK_MSG(strstr(lora_errmsg(ctx), key) != NULL, "message \"%s\" does not name %s", lora_errmsg(ctx), key);
    CHECK(ldm->n == n);
    CHECK(m.unet.n == 0 && m.vae.n == 0 && m.te.n == 0 && m.extra.n == 0);
    sd_model_clear(&m);
}

static void check_errors(lora_ctx *ctx) {
    char *p1 = sd_path("v1_ldm.safetensors"), *p2 = sd_path("v2_ldm.safetensors");
    struct tensor_map a;
    if (!load_st(ctx, p1, &a)) {
        CHECK(0);
        return;
    }
    /* U-Net without conv_in */
    int64_t i = find(&a, "model.diffusion_model.input_blocks.0.0.weight");
    CHECK(i >= 0);
    tmap_remove(&a, i);
    expect_from_fail(ctx, &a, LORA_E_NOT_A_MODEL, "model.diffusion_model.input_blocks.0.0.weight");
    tmap_clear(&a);

    /* VAE attention q missing; then of a shape that cannot be [C,C,1,1] */
    load_st(ctx, p1, &a);
    i = find(&a, "first_stage_model.encoder.mid.attn_1.q.weight");
    CHECK(i >= 0 && a.t[i].ndim == 4);
    struct lora_tensor saved = a.t[i];
    a.t[i].ndim = 1;
    a.t[i].shape[0] = saved.shape[0] * saved.shape[1];
    expect_from_fail(ctx, &a, LORA_E_SHAPE_MISMATCH, "first_stage_model.encoder.mid.attn_1.q.weight");
    a.t[i].ndim = saved.ndim;
    a.t[i].shape[0] = saved.shape[0];
    tmap_remove(&a, i);
    expect_from_fail(ctx, &a, LORA_E_NOT_A_MODEL, "first_stage_model.encoder.mid.attn_1.q.weight");
    tmap_clear(&a);

    /* a resnet conv of the wrong rank */
    load_st(ctx, p1, &a);
    i = find(&a, "model.diffusion_model.output_blocks.4.0.in_layers.2.weight");
    CHECK(i >= 0);
    CHECK(a.t[i].ndim == 4);
    a.t[i].ndim = 2;   /* [C, Cin*3*3]: same bytes, a Linear's rank */
    a.t[i].shape[1] *= a.t[i].shape[2] * a.t[i].shape[3];
    expect_from_fail(ctx, &a, LORA_E_SHAPE_MISMATCH, "model.diffusion_model.output_blocks.4.0.in_layers.2.weight");
    tmap_clear(&a);

    /* no text encoder at all */
    load_st(ctx, p1, &a);
    for (int64_t k = a.n - 1; k >= 0; k--)
        if (strncmp(a.t[k].name, "cond_stage_model.", 17) == 0) tmap_remove(&a, k);
    expect_from_fail(ctx, &a, LORA_E_NOT_A_MODEL, "cond_stage_model.transformer.text_model.encoder.layers.0");
    tmap_clear(&a);

    /* an old v1 text encoder (no text_model level) reads the same; a mix of both is refused */
    struct tensor_map b;
    load_st(ctx, p1, &a);
    load_st(ctx, p1, &b);
    for (int64_t k = 0; k < a.n; k++) {
        const char *pre = "cond_stage_model.transformer.text_model.";
        if (strncmp(a.t[k].name, pre, strlen(pre)) == 0) {
            char nm[512];
            snprintf(nm, sizeof nm, "cond_stage_model.transformer.%s", a.t[k].name + strlen(pre));
            CHECK_STATUS(tmap_rename(&a, k, nm), LORA_OK);
        }
    }
    struct sd_model mo, mn;
    CHECK_STATUS(sd_from_ldm(ctx, &a, &mo), LORA_OK);
    CHECK_STATUS(sd_from_ldm(ctx, &b, &mn), LORA_OK);
    check_same_map("old-layout v1 text encoder", &mo.te, &mn.te);
    CHECK(mo.cfg.te_layers == mn.cfg.te_layers && mo.cfg.te_layers == 3);
    struct tensor_map back;
    CHECK_STATUS(sd_to_ldm(&mo, &back), LORA_OK);
    CHECK(find(&back, "cond_stage_model.transformer.text_model.final_layer_norm.weight") >= 0);
    CHECK(find(&back, "cond_stage_model.transformer.final_layer_norm.weight") < 0);
    tmap_clear(&back);

    /* to_ldm: a v1 extra tensor that a mapped tensor also becomes */
    int64_t e = find(&mn.extra, "alphas_cumprod");
    CHECK(e >= 0);
    CHECK_STATUS(tmap_rename(&mn.extra, e, "model.diffusion_model.out.2.weight"), LORA_OK);
    CHECK_STATUS(sd_to_ldm(&mn, &back), LORA_E_INVALID_ARG);
    CHECK(strstr(lora_errmsg(ctx), "model.diffusion_model.out.2.weight") != NULL);
    CHECK(back.n == 0);
    CHECK_STATUS(tmap_rename(&mn.extra, e, "alphas_cumprod"), LORA_OK);
    /* to_ldm: a U-Net tensor with no LDM name */
    int64_t dims[1] = {1};
    float one = 1.0f;
    CHECK_STATUS(tmap_add(&mn.unet, "down_blocks.0.resnets.0.bogus.weight", LORA_DTYPE_F32, 1, dims, &one, 4, 1, 1),
                 LORA_OK);
    CHECK_STATUS(sd_to_ldm(&mn, &back), LORA_E_UNSUPPORTED_LAYOUT);
    CHECK(strstr(lora_errmsg(ctx), "down_blocks.0.resnets.0.bogus.weight") != NULL);
    CHECK(back.n == 0);
    sd_model_clear(&mo);
    sd_model_clear(&mn);

    /* mixed old and new v1 text encoder names map twice */
    load_st(ctx, p1, &b);
    i = find(&b, "cond_stage_model.transformer.text_model.final_layer_norm.weight");
    CHECK(i >= 0);
    CHECK_STATUS(tmap_add(&b, "cond_stage_model.transformer.final_layer_norm.weight", b.t[i].dtype, b.t[i].ndim,
                          b.t[i].shape, b.t[i].data, b.t[i].nbytes, 1, 1),
                 LORA_OK);
    expect_from_fail(ctx, &b, LORA_E_UNSUPPORTED_LAYOUT, "text_model.final_layer_norm.weight");
    tmap_clear(&b);

    /* v2: a packed in_proj that is not [3H,H]; one that is missing */
    load_st(ctx, p2, &a);
    const char *ip = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight";
    i = find(&a, ip);
    CHECK(i >= 0 && a.t[i].ndim == 2 && a.t[i].shape[0] == 3 * a.t[i].shape[1]);
    int64_t r = a.t[i].shape[0];
    a.t[i].shape[0] = a.t[i].shape[1];
    a.t[i].shape[1] = r;
    expect_from_fail(ctx, &a, LORA_E_SHAPE_MISMATCH, ip);
    tmap_remove(&a, i);
    expect_from_fail(ctx, &a, LORA_E_NOT_A_MODEL, ip);
    tmap_clear(&a);

    /* v2 to_ldm: q without k */
    load_st(ctx, p2, &a);
    CHECK_STATUS(sd_from_ldm(ctx, &a, &mn), LORA_OK);
    i = find(&mn.te, "text_model.encoder.layers.0.self_attn.k_proj.weight");
    CHECK(i >= 0);
    tmap_remove(&mn.te, i);
    CHECK_STATUS(sd_to_ldm(&mn, &back), LORA_E_NOT_A_MODEL);
    CHECK(strstr(lora_errmsg(ctx), "text_model.encoder.layers.0.self_attn.k_proj.weight") != NULL);
    CHECK(back.n == 0);
    /* its last, unused resblock stays in extra and comes back */
    CHECK(find(&mn.extra, "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight") >= 0);
    CHECK(find(&mn.te, "text_model.encoder.layers.2.self_attn.q_proj.weight") < 0);
    sd_model_clear(&mn);
    tmap_clear(&a);
    free(p1);
    free(p2);
}

int main(void) {
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    snprintf(tmpdir, sizeof tmpdir, "/tmp/lora-test-keymap-XXXXXX");
    CHECK(mkdtemp(tmpdir) != NULL);
    check_index_rules(ctx);
    check_version(ctx, "v1");
    check_version(ctx, "v2");
    check_from_diffusers(ctx, "v1");
    check_from_diffusers(ctx, "v2");
    check_errors(ctx);
    CHECK(atomic_load(&ctx->host_bytes) == 0);   /* every owned buffer freed exactly once */
    rmdir(tmpdir);
    lora_ctx_free(ctx);
    return test_finish("test_keymap");
}
