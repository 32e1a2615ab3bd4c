/* The tiny SD fixtures have a 256-token text encoder; the reference scripts replace its token
 * embedding with a 49408-row one from a fixed formula so that real CLIP ids can be looked up.
 * tiny_widen_vocab does the same to a loaded model (the formula must stay the one in
 * tests/reference/make_encode_prompt_reference.py and the scripts that import it). Test-only. */
#ifndef LORA_TESTS_TINY_VOCAB_H
#define LORA_TESTS_TINY_VOCAB_H

#include "internal.h"
#include "io/tensor_map.h"
#include "model/sd_model.h"
#include "test.h"

static void tiny_widen_vocab(lora_ctx *ctx, lora_model *m) {
    struct tensor_map *te = &m->sd.te;
    int64_t i = tmap_find(te, "text_model.embeddings.token_embedding.weight");
    CHECK(i >= 0);
    if (i < 0) return;
    int64_t C = m->sd.cfg.te_hidden, V = 49408;
    float *e = lora_malloc(ctx, (size_t)(V * C) * sizeof *e);
    CHECK(e != NULL);
    if (!e) return;
    for (int64_t r = 0; r < V; r++)
        for (int64_t c = 0; c < C; c++) e[r * C + c] = (float)(((r * 31 + c * 17) % 97) - 48) / 64.0f;
    tmap_remove(te, i);
    int64_t shape[2] = {V, C};
    CHECK_STATUS(tmap_add(te, "text_model.embeddings.token_embedding.weight", LORA_DTYPE_F32, 2, shape, e,
                          (uint64_t)(V * C) * 4, 0, 1), LORA_OK);
    m->sd.cfg.te_vocab = (int32_t)V;
    model_drop_runs(m);   /* a text encoder built from the old embedding is stale */
}

#endif
