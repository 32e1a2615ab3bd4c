/* The streamed merge's byte paths (lib/ops/merge_file.c) and the streamed .ckpt writer:
 *  - tensors a merge leaves alone are copied from the input (copy_file_range): a model whose
 *    untouched text-encoder tensor holds NaNs with payloads (fp16 -> float32 -> fp16 writes the
 *    canonical quiet NaN, sign kept, so that tensor must not be copied) gives the same file as
 *    the in-memory merge, the NaNs canonical, every other byte of it and of the VAE the input's;
 *  - ckpt_stream_*: a map of every dtype torch 1.13 stores (empty and 0-d tensors too) written
 *    one tensor at a time from buffers freed right after each call, read back with ckpt_read
 *    bit for bit, and the same bytes as ckpt_write; misuse (wrong size, too few or too many
 *    tensors) fails with no output and no temp file. */
#include <dirent.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/dtype.h"
#include "io/ckpt.h"
#include "io/st_map.h"
#include "../test.h"

static const char *data_dir;
static char tmp_dir[256];

#define POISONED "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
#define VAE_T "first_stage_model.decoder.conv_in.weight"

static void test_nan_copy(lora_ctx *ctx) {
    char *src = test_path_join(data_dir, "sd/v1_ldm.safetensors"), *np = test_path_join(data_dir, "network/v1_kohya.safetensors");
    char model[400], mem[400], str[400];
    snprintf(model, sizeof model, "%s/nan_model.safetensors", tmp_dir);
    snprintf(mem, sizeof mem, "%s/nan_mem.safetensors", tmp_dir);
    snprintf(str, sizeof str, "%s/nan_stream.safetensors", tmp_dir);
    struct tensor_map in, out;
    tmap_init(&in, ctx);
    tmap_init(&out, ctx);
    CHECK_STATUS(st_read_map(ctx, src, &in, NULL), LORA_OK);
    int64_t pi = tmap_find(&in, POISONED), vi = tmap_find(&in, VAE_T);
    CHECK_MSG(pi >= 0 && vi >= 0 && in.t[pi].dtype == LORA_DTYPE_F16, "fixture lacks %s / %s", POISONED, VAE_T);
    if (pi < 0 || vi < 0) return;
    uint16_t *h = (uint16_t *)in.t[pi].data;
    h[3] = 0x7d01;   /* NaN, payload 0x101 */
    h[5] = 0xfe42;   /* negative quiet NaN with a payload */
    h[6] = 0x7e00;   /* already canonical */
    CHECK_STATUS(st_write_map(ctx, model, &in, NULL, NULL, 0), LORA_OK);

    lora_network *net = NULL;
    CHECK_STATUS(lora_network_load(ctx, np, &net), LORA_OK);
    const double ratio = 0.7;
    lora_params *lo = NULL, *so = NULL;
    CHECK_STATUS(lora_params_create(ctx, &lo), LORA_OK);
    CHECK_STATUS(lora_params_create(ctx, &so), LORA_OK);
    CHECK_STATUS(lora_params_set_string(lo, LORA_P_PRECISION, "float"), LORA_OK);
    CHECK_STATUS(lora_params_set_string(lo, LORA_P_SAVE_PRECISION, "fp16"), LORA_OK);
    CHECK_STATUS(lora_params_set_string(so, LORA_P_SAVE_PRECISION, "fp16"), LORA_OK);
    lora_model *m = NULL;
    CHECK_STATUS(lora_model_load(ctx, model, NULL, &m), LORA_OK);
    CHECK_STATUS(lora_model_cast(m, LORA_DTYPE_F32), LORA_OK);
    CHECK_STATUS(lora_merge_into_model(m, (const lora_network *const *)&net, &ratio, 1), LORA_OK);
    CHECK_STATUS(lora_model_save(m, mem, so), LORA_OK);
    lora_model_free(m);
    lora_status s = lora_merge_file(ctx, model, (const lora_network *const *)&net, &ratio, 1, str, lo);
    CHECK_MSG(s == LORA_OK, "merge_file: %s", lora_errmsg(ctx));
    CHECK_MSG(test_same_file(mem, str), "NaN model: streamed file differs from the in-memory merge");

    CHECK_STATUS(st_read_map(ctx, str, &out, NULL), LORA_OK);
    int64_t po = tmap_find(&out, POISONED), vo = tmap_find(&out, VAE_T);
    CHECK(po >= 0 && vo >= 0);
    if (po >= 0 && vo >= 0) {
        const uint16_t *a = (const uint16_t *)in.t[pi].data, *b = (const uint16_t *)out.t[po].data;
        int64_t n = tmap_numel(&in.t[pi]), other = 0;
        CHECK_MSG(b[3] == 0x7e00 && b[5] == 0xfe00 && b[6] == 0x7e00, "NaNs written as %04x %04x %04x", b[3], b[5], b[6]);
        for (int64_t e = 0; e < n; e++)
            if (e != 3 && e != 5) other += a[e] != b[e];
        CHECK_MSG(other == 0, "%lld other values of the NaN tensor changed", (long long)other);
        CHECK(out.t[vo].nbytes == in.t[vi].nbytes && memcmp(out.t[vo].data, in.t[vi].data, in.t[vi].nbytes) == 0);
    }
    /* the same through the streamed .ckpt writer (the merging thread scans there) */
    char memc[400], strc[400];
    snprintf(memc, sizeof memc, "%s/nan_mem.ckpt", tmp_dir);
    snprintf(strc, sizeof strc, "%s/nan_stream.ckpt", tmp_dir);
    CHECK_STATUS(lora_params_set_string(so, LORA_P_SAVE_MODEL_AS, "ckpt"), LORA_OK);
    CHECK_STATUS(lora_model_load(ctx, model, NULL, &m), LORA_OK);
    CHECK_STATUS(lora_model_cast(m, LORA_DTYPE_F32), LORA_OK);
    CHECK_STATUS(lora_merge_into_model(m, (const lora_network *const *)&net, &ratio, 1), LORA_OK);
    CHECK_STATUS(lora_model_save(m, memc, so), LORA_OK);
    lora_model_free(m);
    CHECK_STATUS(lora_merge_file(ctx, model, (const lora_network *const *)&net, &ratio, 1, strc, lo), LORA_OK);
    CHECK_MSG(test_same_file(memc, strc), "NaN model: streamed .ckpt differs from the in-memory merge's");
    unlink(memc);
    unlink(strc);
    printf("NaN payloads in an untouched tensor: streamed == in-memory (.safetensors, .ckpt), NaNs canonical, "
           "other bytes kept\n");
    tmap_clear(&out);
    tmap_clear(&in);
    lora_network_free(net);
    lora_params_free(lo);
    lora_params_free(so);
    unlink(model);
    unlink(mem);
    unlink(str);
    free(src);
    free(np);
}

/* ---- streamed .ckpt ------------------------------------------------------------------------ */

static void fill(uint8_t *p, size_t n, uint32_t seed) {
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        p[i] = (uint8_t)x;
    }
}

static void build_map(lora_ctx *ctx, struct tensor_map *m) {
    static const lora_dtype dts[] = {LORA_DTYPE_F32, LORA_DTYPE_F16, LORA_DTYPE_BF16, LORA_DTYPE_F64, LORA_DTYPE_I64,
                                     LORA_DTYPE_I32, LORA_DTYPE_I16, LORA_DTYPE_I8, LORA_DTYPE_U8, LORA_DTYPE_BOOL};
    tmap_init(m, ctx);
    for (int i = 0; i < 12; i++) {
        lora_dtype dt = dts[i % 10];
        int64_t shape[3] = {3 + i, 5, i == 10 ? 0 : 7};
        int32_t nd = i == 11 ? 0 : 3;   /* 10: an empty tensor, 11: a 0-d one */
        int64_t numel = nd ? shape[0] * shape[1] * shape[2] : 1;
        uint64_t nb = (uint64_t)numel * (uint64_t)(lora_dtype_bits(dt) / 8);
        uint8_t *d = malloc(nb + 1);
        fill(d, nb, (uint32_t)i);
        if (dt == LORA_DTYPE_BOOL)
            for (uint64_t k = 0; k < nb; k++) d[k] &= 1;
        char name[64];
        snprintf(name, sizeof name, "model.layer_%d.weight", i);
        CHECK_STATUS(tmap_add(m, name, dt, nd, shape, d, nb, 1, 0), LORA_OK);
        free(d);
    }
}

static void test_ckpt_stream(lora_ctx *ctx) {
    struct tensor_map m, back;
    build_map(ctx, &m);
    tmap_init(&back, ctx);
    char a[400], b[400];
    snprintf(a, sizeof a, "%s/streamed.ckpt", tmp_dir);
    snprintf(b, sizeof b, "%s/whole.ckpt", tmp_dir);
    struct ckpt_stream *cs = NULL;
    CHECK_STATUS(ckpt_stream_begin(ctx, a, &m, 1, &cs), LORA_OK);
    for (int64_t i = 0; cs && i < m.n; i++) {   /* each tensor from a buffer that dies right after */
        uint8_t *copy = malloc(m.t[i].nbytes + 1);
        memcpy(copy, m.t[i].data, m.t[i].nbytes);
        CHECK_STATUS(ckpt_stream_tensor(cs, copy, m.t[i].nbytes), LORA_OK);
        memset(copy, 0xa5, m.t[i].nbytes);
        free(copy);
    }
    CHECK_STATUS(ckpt_stream_finish(cs), LORA_OK);
    CHECK_STATUS(ckpt_write(ctx, b, &m, 1), LORA_OK);
    CHECK_MSG(test_same_file(a, b), "streamed .ckpt differs from ckpt_write's");
    CHECK_STATUS(ckpt_read(ctx, a, &back), LORA_OK);
    CHECK_MSG(back.n == m.n, "%lld tensors read back, %lld written", (long long)back.n, (long long)m.n);
    int64_t bad = 0;
    for (int64_t i = 0; i < m.n && i < back.n; i++) {
        const struct lora_tensor *x = &m.t[i], *y = &back.t[i];
        bad += strcmp(x->name, y->name) != 0 || x->dtype != y->dtype || x->ndim != y->ndim || x->nbytes != y->nbytes ||
               memcmp(x->shape, y->shape, (size_t)x->ndim * sizeof x->shape[0]) != 0 ||
               (x->nbytes && memcmp(x->data, y->data, x->nbytes) != 0);
    }
    CHECK_MSG(bad == 0, "%lld tensors differ after the streamed round trip", (long long)bad);
    printf("streamed .ckpt: %lld tensors of 10 dtypes round trip bit for bit, same bytes as ckpt_write\n", (long long)m.n);
    tmap_clear(&back);
    unlink(a);
    unlink(b);

    /* misuse: nothing is left behind */
    CHECK_STATUS(ckpt_stream_begin(ctx, a, &m, 0, &cs), LORA_OK);
    CHECK_STATUS(ckpt_stream_tensor(cs, m.t[0].data, m.t[0].nbytes + 1), LORA_E_INVALID_ARG);
    CHECK_MSG(strstr(lora_errmsg(ctx), "archive/data/0") != NULL, "message: %s", lora_errmsg(ctx));
    ckpt_stream_abort(cs);
    CHECK(access(a, F_OK) != 0 && test_temp_files(tmp_dir) == 0);
    CHECK_STATUS(ckpt_stream_begin(ctx, a, &m, 0, &cs), LORA_OK);
    CHECK_STATUS(ckpt_stream_tensor(cs, m.t[0].data, m.t[0].nbytes), LORA_OK);
    CHECK_STATUS(ckpt_stream_finish(cs), LORA_E_INVALID_ARG);   /* 1 of 12 written */
    CHECK(access(a, F_OK) != 0 && test_temp_files(tmp_dir) == 0);
    CHECK_STATUS(ckpt_stream_begin(ctx, a, &m, 0, &cs), LORA_OK);
    for (int64_t i = 0; i < m.n; i++) CHECK_STATUS(ckpt_stream_tensor(cs, m.t[i].data, m.t[i].nbytes), LORA_OK);
    CHECK_STATUS(ckpt_stream_tensor(cs, m.t[0].data, m.t[0].nbytes), LORA_E_INVALID_ARG);   /* one too many */
    ckpt_stream_abort(cs);
    CHECK(access(a, F_OK) != 0 && test_temp_files(tmp_dir) == 0);
    tmap_clear(&m);
}

int main(void) {
    data_dir = getenv("LORA_TEST_DATA");
    if (!data_dir) data_dir = "tests/data";
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/lora_test_merge_copy_%d", (int)getpid());
    mkdir(tmp_dir, 0700);
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    test_nan_copy(ctx);
    test_ckpt_stream(ctx);
    CHECK(test_temp_files(tmp_dir) == 0);
    uint64_t host = 1;
    lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
    CHECK_MSG(host == 0, "%llu host bytes leaked", (unsigned long long)host);
    lora_ctx_free(ctx);
    rmdir(tmp_dir);
    return test_finish("test_merge_copy");
}
