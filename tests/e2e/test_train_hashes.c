/* sshs_model_hash / sshs_legacy_hash of a saved LoRA against kohya-ss sd-scripts' own
 * train_util.precalculate_safetensors_hashes (tests/data/trainer/hashes.json from
 * tests/reference/make_trainer_fixtures.py): the same deterministic state dict and metadata,
 * saved by md_save_network in float32 and in fp16 (save_precision, alpha cast too). The legacy
 * hash reads a window at 1 MiB of the serialisation, so it also checks that our header has
 * Python's length (non-ASCII, quotes and backslashes in values). The file's own metadata keeps
 * the non-ss key, which the hashes must ignore. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "io/safetensors.h"
#include "network/network.h"
#include "train/metadata.h"
#include "../test.h"

static float val(int64_t i, int64_t t) { return (float)(((i * 7919 + 13 * t) % 2001) - 1000) / 1024.0f; }

static void check_case(lora_ctx *ctx, json_t *root, const char *cas, lora_dtype dt) {
    json_t *mods = json_object_get(root, "modules"), *meta = json_object_get(root, "metadata");
    json_t *want = json_object_get(json_object_get(root, "lora"), cas);
    if (!json_is_array(mods) || !json_is_object(meta) || !json_is_object(want)) {
        CHECK_MSG(0, "hashes.json incomplete");
        return;
    }
    struct lora_network *net = NULL;
    int64_t n = (int64_t)json_array_size(mods);
    CHECK_STATUS(net_alloc(ctx, n, &net), LORA_OK);
    if (!net) return;
    int64_t t = 0;
    for (int64_t k = 0; k < n; k++) {
        json_t *m = json_array_get(mods, (size_t)k);
        struct net_module *mm = &net->m[k];
        mm->name = lora_strdup(ctx, json_string_value(json_array_get(m, 0)));
        mm->rank = json_integer_value(json_array_get(m, 1));
        mm->in = json_integer_value(json_array_get(m, 2));
        mm->out = json_integer_value(json_array_get(m, 3));
        mm->alpha = json_real_value(json_array_get(m, 4));
        mm->kh = mm->kw = 1;
        mm->kind = NET_LINEAR;
        mm->is_te = strncmp(mm->name, "lora_te", 7) == 0;
        mm->down_ndim = mm->up_ndim = 2;
        mm->has_alpha = 1;
        mm->dtype = mm->alpha_dtype = LORA_DTYPE_F32;
        mm->down = lora_malloc(ctx, (size_t)(mm->rank * mm->in) * 4);
        mm->up = lora_malloc(ctx, (size_t)(mm->out * mm->rank) * 4);
        for (int64_t i = 0; i < mm->rank * mm->in; i++) mm->down[i] = val(i, t);
        t++;
        for (int64_t i = 0; i < mm->out * mm->rank; i++) mm->up[i] = val(i, t);
        t++;
        net_module_bind(mm);
    }
    net->n = n;
    struct md_list md;
    md_init(&md, ctx);
    const char *key;
    json_t *v;
    json_object_foreach(meta, key, v) md_set(&md, key, json_string_value(v));
    char path[256];
    snprintf(path, sizeof path, "/tmp/lora-hashes-%d-%s.safetensors", (int)getpid(), cas);
    CHECK_STATUS(md_save_network(net, path, &md, dt), LORA_OK);
    struct lora_file *f = NULL;
    CHECK_STATUS(st_open(ctx, path, &f), LORA_OK);
    if (f) {
        const char *mh = NULL, *lh = NULL, *note = NULL;
        for (int64_t j = 0; j < f->n_meta; j++) {
            if (strcmp(f->meta_keys[j], "sshs_model_hash") == 0) mh = f->meta_vals[j];
            if (strcmp(f->meta_keys[j], "sshs_legacy_hash") == 0) lh = f->meta_vals[j];
            if (strcmp(f->meta_keys[j], "user_note") == 0) note = f->meta_vals[j];
        }
        const char *wm = json_string_value(json_object_get(want, "sshs_model_hash"));
        const char *wl = json_string_value(json_object_get(want, "sshs_legacy_hash"));
        CHECK_MSG(mh && wm && strcmp(mh, wm) == 0, "%s: sshs_model_hash %s, kohya %s", cas, mh ? mh : "-", wm ? wm : "-");
        CHECK_MSG(lh && wl && strcmp(lh, wl) == 0, "%s: sshs_legacy_hash %s, kohya %s", cas, lh ? lh : "-", wl ? wl : "-");
        CHECK(note && strcmp(note, "not an ss key") == 0);
        printf("%s: sshs_model_hash %.16s... legacy %s (kohya %.16s... %s), file %llu bytes\n", cas, mh ? mh : "-",
               lh ? lh : "-", wm ? wm : "-", wl ? wl : "-", (unsigned long long)f->size);
        st_close(f);
    }
    unlink(path);
    md_free(&md);
    net_free(net);
}

int main(void) {
    const char *data = getenv("LORA_TEST_DATA");
    if (!data) data = "tests/data";
    char path[1024];
    snprintf(path, sizeof path, "%s/trainer/hashes.json", data);
    json_error_t err;
    json_t *root = json_load_file(path, 0, &err);
    CHECK_MSG(root != NULL, "%s: %s", path, err.text);
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    if (root && ctx) {
        check_case(ctx, root, "float", 0);
        check_case(ctx, root, "fp16", LORA_DTYPE_F16);
    }
    json_decref(root);
    lora_ctx_free(ctx);
    return test_finish("test_train_hashes");
}
