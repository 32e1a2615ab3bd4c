/* gen_prompt_encode_pair against kohya's get_weighted_text_embeddings (gen_img_diffusers.py,
 * called by tests/reference/make_prompt_fixtures.py on the tiny v1/v2 text encoders with the
 * 49408-row formula token embedding of make_encode_prompt_reference.py): emphasis, nesting,
 * escapes, weights < 1 and < 0, long prompts and negatives (max_embeddings_multiples 3),
 * truncation, BREAK (A1111 rule, see the script), clip_skip 1/2, no-CFG (negative NULL), and a
 * batch of two prompts sized by the longer (min_chunks). Checked: kohya's padded ids and
 * per-position weights (exact), the 77-id chunks sent to the encoder (exact), and cond/uncond
 * (relative L2 <= 1e-5). */
#include <string.h>

#include <jansson.h>

#include "internal.h"
#include "gen/prompt.h"
#include "io/safetensors.h"
#include "model/sd_model.h"
#include "model/tokenizer.h"
#include "../test.h"
#include "../ref_file.h"
#include "../tiny_vocab.h"

static lora_ctx *ctx;
static int n_cut_warnings;

static void on_log(void *user, lora_log_level level, const char *message) {
    (void)user;
    if (level == LORA_LOG_WARN && strstr(message, "was cut to")) n_cut_warnings++;
}


/* rel L2 of s*a vs b for the best scalar s: the conditioning up to kohya's re-normalisation
 * factor, which is ill-conditioned when the means nearly cancel. */
static double rel_l2_scaled(const float *a, const float *b, int64_t n) {
    double ab = 0, aa = 0, num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) ab += (double)a[i] * b[i], aa += (double)a[i] * a[i];
    double s = aa > 0 ? ab / aa : 1;
    for (int64_t i = 0; i < n; i++) {
        double d = s * a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

/* Tolerance: 1e-5, plus 2e-8 * kappa for the re-normalisation's conditioning (the script's
 * kappa = mean|E|/|mean E| + mean|wE|/|mean wE|; float32 noise in the encoder output and in
 * kohya's float32 means moves the factor by about 1e-8 * kappa). */
static void compare(const char *name, const char *what, const float *got, const float *want, int64_t n, double kappa,
                    int64_t T, int64_t D) {
    double e = rel_l2(got, want, n), es = rel_l2_scaled(got, want, n);
    double tol = 1e-5 + 2e-8 * kappa;
    printf("%-26s %-6s [%lld x %lld] rel L2 %.2e (tol %.1e, kappa %.0f), up to scale %.2e\n", name, what,
           (long long)T, (long long)D, e, tol, kappa, es);
    CHECK_MSG(e <= tol, "%s: %s rel L2 %g > %g", name, what, e, tol);
    CHECK_MSG(es <= 1e-5, "%s: %s rel L2 up to scale %g", name, what, es);
}

static const char *meta(const struct lora_file *f, const char *key) {
    for (int64_t i = 0; i < f->n_meta; i++)
        if (!strcmp(f->meta_keys[i], key)) return f->meta_vals[i];
    return NULL;
}

/* An int32 tensor of the reference (NULL if absent) and its length. */
static const int32_t *ref_i32(const struct lora_file *f, const char *name, int64_t *n) {
    int64_t i = ref_find(f, name);
    if (i < 0 || f->tensors[i].dtype != LORA_DTYPE_I32) return NULL;
    *n = (int64_t)((f->tensors[i].end - f->tensors[i].begin) / 4);
    return (const int32_t *)st_data(f, i);
}

/* Padded ids, weights and chunks of one text vs the reference. */
static void check_layout(lora_model *m, const struct lora_file *ref, const char *name, const char *pfx,
                         const char *text, int32_t M, int64_t chunks) {
    int32_t *ids;
    float *w;
    int64_t n;
    int trunc;
    CHECK_STATUS(gen_prompt_tokens(m, text, 75 * (int64_t)M, &ids, &w, &n, &trunc), LORA_OK);
    int64_t L = 75 * chunks + 2, T = 77 * chunks;
    int32_t *pid = calloc((size_t)L, sizeof *pid), *cid = calloc((size_t)T, sizeof *cid);
    float *pw = calloc((size_t)T, sizeof *pw);
    gen_prompt_pad(ids, w, n, chunks, m->tokenizer->pad_id, pid, pw);
    gen_prompt_chunk_ids(pid, chunks, m->tokenizer->pad_id, cid);
    char tn[256];
    int64_t rn = 0;
    snprintf(tn, sizeof tn, "%s.%sids", name, pfx);
    const int32_t *rid = ref_i32(ref, tn, &rn);
    CHECK_MSG(rid && rn == L && memcmp(rid, pid, (size_t)L * 4) == 0, "%s: padded ids differ from kohya's", tn);
    snprintf(tn, sizeof tn, "%s.%sweights", name, pfx);
    const float *rw = ref_f32(ref, tn, &rn);
    CHECK_MSG(rw && rn == T && memcmp(rw, pw, (size_t)T * 4) == 0, "%s: weights differ from kohya's", tn);
    snprintf(tn, sizeof tn, "%s.%schunks", name, pfx);
    const int32_t *rc = ref_i32(ref, tn, &rn);
    CHECK_MSG(rc && rn == T && memcmp(rc, cid, (size_t)T * 4) == 0, "%s: encoder chunks differ from kohya's", tn);
    free(pid);
    free(cid);
    free(pw);
    lora_free(m->ctx, ids);
    lora_free(m->ctx, w);
}

static int run_file(lora_model *m, const char *path) {
    struct lora_file *ref = NULL;
    CHECK_STATUS(st_open(ctx, path, &ref), LORA_OK);
    if (!ref) return 0;
    json_t *cases = json_loads(meta(ref, "cases"), 0, NULL);
    CHECK(json_is_array(cases) && json_array_size(cases) >= 4);
    size_t k;
    json_t *c;
    int compared = 0;
    json_array_foreach(cases, k, c) {
        const char *name = json_string_value(json_object_get(c, "name"));
        const char *prompt = json_string_value(json_object_get(c, "prompt"));
        json_t *jn = json_object_get(c, "negative");
        const char *negative = json_is_null(jn) ? NULL : json_string_value(jn);
        int32_t M = (int32_t)json_integer_value(json_object_get(c, "max_embeddings_multiples"));
        int32_t skip = (int32_t)json_integer_value(json_object_get(c, "clip_skip"));
        int64_t want_T = json_integer_value(json_object_get(c, "n_tokens"));
        float *cond = NULL, *uncond = NULL;
        int64_t T = 0;
        n_cut_warnings = 0;
        lora_status s = gen_prompt_encode_pair(m, prompt, negative, skip, M, &cond, negative ? &uncond : NULL, &T);
        CHECK_MSG(s == LORA_OK, "%s: %s", name, lora_errmsg(ctx));
        /* kohya prints a warning when it cuts a prompt; so do we (the truncate cases only) */
        CHECK_MSG((n_cut_warnings > 0) == (strstr(name, "truncate") != NULL), "%s: %d truncation warnings", name,
                  n_cut_warnings);
        if (s != LORA_OK) continue;
        CHECK_MSG(T == want_T, "%s: %lld tokens, kohya %lld", name, (long long)T, (long long)want_T);
        int64_t D = m->sd.cfg.te_hidden, rn = 0;
        char tn[256];
        snprintf(tn, sizeof tn, "%s.cond", name);
        const float *rc = ref_f32(ref, tn, &rn);
        if (rc && rn == T * D) {
            compare(name, "cond", cond, rc, rn, json_number_value(json_object_get(c, "kappa")), T, D);
            compared++;
        } else {
            CHECK_MSG(0, "%s: reference cond missing or of another size", name);
        }
        if (negative) {
            snprintf(tn, sizeof tn, "%s.uncond", name);
            const float *ru = ref_f32(ref, tn, &rn);
            CHECK_MSG(ru && rn == T * D && uncond, "%s: uncond", name);
            if (ru && rn == T * D && uncond)
                compare(name, "uncond", uncond, ru, rn, json_number_value(json_object_get(c, "kappa_negative")), T, D);
        } else {
            CHECK(uncond == NULL);
        }
        check_layout(m, ref, name, "", prompt, M, T / 77);
        if (negative) check_layout(m, ref, name, "neg_", negative, M, T / 77);
        lora_free(ctx, cond);
        lora_free(ctx, uncond);
    }
    int n = (int)json_array_size(cases);
    CHECK_MSG(compared == n, "%d of %d cases compared", compared, n);
    json_decref(cases);
    st_close(ref);
    return compared;
}

int main(void) {
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    lora_ctx_set_log(ctx, on_log, NULL, LORA_LOG_WARN);
    const char *data = getenv("LORA_TEST_DATA") ? getenv("LORA_TEST_DATA") : "tests/data";
    char path[4096];
    lora_model *models[3] = {NULL, NULL, NULL};
    for (int v = 1; v <= 2; v++) {
        snprintf(path, sizeof path, "%s/sd/v%d_diffusers", data, v);
        CHECK_STATUS(lora_model_load(ctx, path, NULL, &models[v]), LORA_OK);
        if (!models[v]) continue;
        tiny_widen_vocab(ctx, models[v]);
        snprintf(path, sizeof path, "%s/prompt/weighting_v%d.safetensors", data, v);
        run_file(models[v], path);
    }

    /* a batch: kohya sizes both prompts by the longer one -> min_chunks from count_chunks */
    snprintf(path, sizeof path, "%s/prompt/weighting_batch.safetensors", data);
    struct lora_file *ref = NULL;
    CHECK_STATUS(st_open(ctx, path, &ref), LORA_OK);
    if (ref && models[1]) {
        json_t *bc = json_loads(meta(ref, "case"), 0, NULL);
        json_t *ps = json_object_get(bc, "prompts"), *ns = json_object_get(bc, "negatives");
        int32_t M = (int32_t)json_integer_value(json_object_get(bc, "max_embeddings_multiples"));
        int32_t most = 0;
        for (size_t i = 0; i < 2; i++) {
            int32_t a = 0, b = 0;
            CHECK_STATUS(gen_prompt_count_chunks(models[1], json_string_value(json_array_get(ps, i)), M, &a), LORA_OK);
            CHECK_STATUS(gen_prompt_count_chunks(models[1], json_string_value(json_array_get(ns, i)), M, &b), LORA_OK);
            if (a > most) most = a;
            if (b > most) most = b;
        }
        CHECK(most == 2);
        for (size_t i = 0; i < 2; i++) {
            struct gen_prompt_encode_opts o = {0};
            o.max_embeddings_multiples = M;
            o.min_chunks = most;
            o.clip_skip = (int32_t)json_integer_value(json_object_get(bc, "clip_skip"));
            float *cond = NULL, *uncond = NULL;
            int64_t T = 0, rn = 0, D = models[1]->sd.cfg.te_hidden;
            CHECK_STATUS(gen_prompt_encode_ex(models[1], json_string_value(json_array_get(ps, i)),
                                              json_string_value(json_array_get(ns, i)), &o, &cond, &uncond, &T),
                         LORA_OK);
            char tn[32];
            snprintf(tn, sizeof tn, "cond%zu", i);
            const float *rc = ref_f32(ref, tn, &rn);
            CHECK_MSG(rc && cond && rn == T * D, "batch %s: size", tn);
            if (rc && cond && rn == T * D) {
                double e = rel_l2(cond, rc, rn);
                printf("batch prompt %zu             cond   [%lld x %lld] rel L2 %.2e\n", i, (long long)T, (long long)D, e);
                CHECK_MSG(e <= 1e-5, "batch %s rel L2 %g", tn, e);
            }
            snprintf(tn, sizeof tn, "uncond%zu", i);
            const float *ru = ref_f32(ref, tn, &rn);
            CHECK_MSG(ru && uncond && rn == T * D, "batch %s: size", tn);
            if (ru && uncond && rn == T * D) {
                double e = rel_l2(uncond, ru, rn);
                printf("batch prompt %zu             uncond [%lld x %lld] rel L2 %.2e\n", i, (long long)T, (long long)D, e);
                CHECK_MSG(e <= 1e-5, "batch %s rel L2 %g", tn, e);
            }
            lora_free(ctx, cond);
            lora_free(ctx, uncond);
        }
        json_decref(bc);
    }
    if (ref) st_close(ref);
    lora_model_free(models[1]);
    lora_model_free(models[2]);
    uint64_t host = 1;
    lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
    CHECK_MSG(host == 0, "%llu bytes left", (unsigned long long)host);
    lora_ctx_free(ctx);
    return test_finish("test_prompt_weighting");
}
