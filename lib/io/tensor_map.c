#include <string.h>

#include "core/dtype.h"
#include "io/tensor_map.h"

void tmap_init(struct tensor_map *m, lora_ctx *ctx) {
    memset(m, 0, sizeof *m);
    m->ctx = ctx;
}

void tmap_clear(struct tensor_map *m) {
    for (int64_t i = 0; i < m->n; i++) {
        lora_free(m->ctx, m->t[i].name);
        if (m->t[i].owned) lora_free(m->ctx, m->t[i].data);
    }
    lora_free(m->ctx, m->t);
    lora_free(m->ctx, m->slots);
    lora_ctx *ctx = m->ctx;
    tmap_init(m, ctx);
}

static uint64_t name_hash(const char *s) {
    uint64_t h = 1469598103934665603ull;   /* FNV-1a */
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

static lora_status reindex(struct tensor_map *m, int64_t n_slots) {
    /* same size: rebuild in place, so removal and rename never fail for memory */
    int64_t *slots = n_slots == m->n_slots ? m->slots : lora_calloc(m->ctx, (size_t)n_slots, sizeof *slots);
    if (!slots) return LORA_E_NOMEM;
    if (slots == m->slots) memset(slots, 0, (size_t)n_slots * sizeof *slots);
    for (int64_t i = 0; i < m->n; i++) {
        uint64_t h = name_hash(m->t[i].name) & (uint64_t)(n_slots - 1);
        while (slots[h]) h = (h + 1) & (uint64_t)(n_slots - 1);
        slots[h] = i + 1;
    }
    if (slots != m->slots) lora_free(m->ctx, m->slots);
    m->slots = slots;
    m->n_slots = n_slots;
    return LORA_OK;
}

int64_t tmap_find(const struct tensor_map *m, const char *name) {
    if (!m->n_slots) return -1;
    uint64_t h = name_hash(name) & (uint64_t)(m->n_slots - 1);
    while (m->slots[h]) {
        int64_t i = m->slots[h] - 1;
        if (strcmp(m->t[i].name, name) == 0) return i;
        h = (h + 1) & (uint64_t)(m->n_slots - 1);
    }
    return -1;
}

int64_t tmap_numel(const struct lora_tensor *t) {
    int64_t n = 1;
    for (int32_t d = 0; d < t->ndim; d++) n *= t->shape[d];
    return n;
}

lora_status tmap_add(struct tensor_map *m, const char *name, lora_dtype dtype, int32_t ndim, const int64_t *shape,
                     const void *data, uint64_t nbytes, int copy, int owned) {
    int bits = lora_dtype_bits(dtype);
    int64_t nel;
    uint64_t need;
    if (!name || bits == 0 || ndim < 0 || ndim > TM_MAX_RANK || (ndim > 0 && !shape))
        return lora_fail(m->ctx, LORA_E_INVALID_ARG, "tensor \"%s\": bad name, dtype or rank", name ? name : "(null)");
    if (!ck_numel(shape, ndim, &nel) || !ck_mul_u64((uint64_t)nel, (uint64_t)bits / 8, &need) || need != nbytes)
        return lora_fail(m->ctx, LORA_E_INVALID_ARG, "tensor \"%s\": shape does not match its %llu bytes", name,
                         (unsigned long long)nbytes);
    if (tmap_find(m, name) >= 0)
        return lora_fail(m->ctx, LORA_E_INVALID_ARG, "tensor \"%s\" appears twice", name);
    if (m->n == m->cap) {
        int64_t cap = m->cap ? m->cap * 2 : 64;
        struct lora_tensor *t = lora_malloc(m->ctx, (size_t)cap * sizeof *t);
        if (!t) return LORA_E_NOMEM;
        if (m->n) memcpy(t, m->t, (size_t)m->n * sizeof *t);
        lora_free(m->ctx, m->t);
        m->t = t;
        m->cap = cap;
    }
    if ((m->n + 1) * 2 > m->n_slots) LORA_TRY(reindex(m, m->n_slots ? m->n_slots * 2 : 128));
    struct lora_tensor *t = &m->t[m->n];
    memset(t, 0, sizeof *t);
    t->name = lora_strdup(m->ctx, name);
    if (!t->name) return LORA_E_NOMEM;
    if (copy) {
        t->data = lora_malloc(m->ctx, nbytes ? (size_t)nbytes : 1);
        if (!t->data) {
            lora_free(m->ctx, t->name);
            return LORA_E_NOMEM;
        }
        if (nbytes) memcpy(t->data, data, (size_t)nbytes);
        t->owned = 1;
    } else {
        t->data = (void *)data;
        t->owned = owned;
    }
    t->dtype = dtype;
    t->ndim = ndim;
    for (int32_t d = 0; d < ndim; d++) t->shape[d] = shape[d];
    t->nbytes = nbytes;
    uint64_t h = name_hash(name) & (uint64_t)(m->n_slots - 1);
    while (m->slots[h]) h = (h + 1) & (uint64_t)(m->n_slots - 1);
    m->slots[h] = m->n + 1;
    m->n++;
    return LORA_OK;
}

void tmap_remove(struct tensor_map *m, int64_t i) {
    if (i < 0 || i >= m->n) return;
    lora_free(m->ctx, m->t[i].name);
    if (m->t[i].owned) lora_free(m->ctx, m->t[i].data);
    memmove(&m->t[i], &m->t[i + 1], (size_t)(m->n - i - 1) * sizeof *m->t);
    m->n--;
    reindex(m, m->n_slots);   /* in place: cannot fail */
}

lora_status tmap_rename(struct tensor_map *m, int64_t i, const char *name) {
    if (i < 0 || i >= m->n) return LORA_E_INVALID_ARG;
    int64_t j = tmap_find(m, name);
    if (j == i) return LORA_OK;
    if (j >= 0) return lora_fail(m->ctx, LORA_E_INVALID_ARG, "rename: tensor \"%s\" already exists", name);
    char *copy = lora_strdup(m->ctx, name);
    if (!copy) return LORA_E_NOMEM;
    lora_free(m->ctx, m->t[i].name);
    m->t[i].name = copy;
    return reindex(m, m->n_slots);
}
