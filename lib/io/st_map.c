/* safetensors <-> tensor_map: whole-file load (copied out of the mapping, so the map
 * outlives the file) and save. */
#include "io/safetensors.h"
#include "io/st_map.h"

lora_status st_read_map(lora_ctx *ctx, const char *path, struct tensor_map *out, struct lora_file **keep) {
    struct lora_file *f = NULL;
    if (keep) *keep = NULL;
    LORA_TRY(st_open(ctx, path, &f));
    lora_status s = LORA_OK;
    int borrowed = 0;
    for (int64_t i = 0; i < f->n_tensors && s == LORA_OK; i++) {
        const struct st_tensor *t = &f->tensors[i];
        if (t->dtype == LORA_DTYPE_OTHER) {
            s = lora_fail(ctx, LORA_E_UNSUPPORTED, "%s: tensor \"%s\" has dtype %s, which liblora does not load",
                          path, t->name, t->dtype_name);
            break;
        }
        const uint8_t *p = st_data(f, i);
        /* borrow from the mapping when the caller keeps it and the data is aligned for its
         * element type (files written by the reference writer always are) */
        int borrow = keep && f->mapped && ((uintptr_t)p % (uintptr_t)((t->bits + 7) / 8)) == 0;
        s = tmap_add(out, t->name, t->dtype, t->ndim, t->shape, p, t->end - t->begin, !borrow, 0);
        borrowed |= borrow;
    }
    if (s != LORA_OK || !borrowed) {
        if (s != LORA_OK) tmap_clear(out);   /* nothing may point into the mapping */
        st_close(f);
        return s;
    }
    *keep = f;
    return LORA_OK;
}

lora_status st_write_map(lora_ctx *ctx, const char *path, const struct tensor_map *m, const char *const *meta_keys,
                         const char *const *meta_vals, int64_t n_meta) {
    struct st_write_tensor *w = lora_calloc(ctx, (size_t)(m->n ? m->n : 1), sizeof *w);
    if (!w) return LORA_E_NOMEM;
    for (int64_t i = 0; i < m->n; i++) {
        w[i].name = m->t[i].name;
        w[i].dtype = m->t[i].dtype;
        w[i].ndim = m->t[i].ndim;
        w[i].shape = m->t[i].shape;
        w[i].data = m->t[i].data;
    }
    lora_status s = st_write(ctx, path, w, m->n, meta_keys, meta_vals, n_meta);
    lora_free(ctx, w);
    return s;
}
