/* A named collection of host tensors (a "state dict"): what every checkpoint reader fills and
 * every writer consumes. Tensors are C-contiguous. Data is either owned (allocated through the
 * context) or borrowed from a mapping that outlives the map (e.g. an open lora_file). */
#ifndef LORA_IO_TENSOR_MAP_H
#define LORA_IO_TENSOR_MAP_H

#include "internal.h"

#define TM_MAX_RANK 8

struct lora_tensor {
    char *name;
    lora_dtype dtype;          /* never LORA_DTYPE_OTHER */
    int32_t ndim;
    int64_t shape[TM_MAX_RANK];
    uint64_t nbytes;
    void *data;
    int owned;                 /* 1: lora_free(ctx, data) on clear */
};

struct tensor_map {
    lora_ctx *ctx;
    int64_t n, cap;
    struct lora_tensor *t;
    /* open-addressing index over names: slots hold tensor index + 1, 0 = empty */
    int64_t *slots;
    int64_t n_slots;
};

void tmap_init(struct tensor_map *m, lora_ctx *ctx);
void tmap_clear(struct tensor_map *m);       /* frees everything; the map can be reused */
/* Index of `name` or -1. */
int64_t tmap_find(const struct tensor_map *m, const char *name);
/* Adds a tensor. `data` is copied when `copy` is 1; otherwise ownership passes to the map when
 * `owned` is 1, or the map borrows it. Duplicate names -> LORA_E_INVALID_ARG; a shape that is
 * negative, overflows or disagrees with `nbytes` -> LORA_E_INVALID_ARG. */
lora_status tmap_add(struct tensor_map *m, const char *name, lora_dtype dtype, int32_t ndim,
                     const int64_t *shape, const void *data, uint64_t nbytes, int copy, int owned);
/* Removes tensor `i` (order of the others kept). */
void tmap_remove(struct tensor_map *m, int64_t i);
/* Renames tensor `i`; LORA_E_INVALID_ARG if the new name exists. */
lora_status tmap_rename(struct tensor_map *m, int64_t i, const char *name);
/* Element count of tensor i. */
int64_t tmap_numel(const struct lora_tensor *t);

#endif
