/* Tokenizer throughput: the prompts of tests/data/tokenizer/reference_ids.json encoded as
 * kohya's training does (lora_tokenizer_encode), REPS passes over all of them, single thread,
 * after one warm-up pass (the word cache is warm, as it is for a training run's captions).
 * Also a cold figure: a fresh tokenizer per pass. Prints "name prompts_per_second" lines for
 * scripts/bench.sh; the peer is bench/tokenizer_peer.py. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lora/lora.h>

#include "bench_util.h"


int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: bench_tokenizer REPS reference_ids.json\n");
        return 2;
    }
    int reps = atoi(argv[1]);
    if (reps < 1) reps = 1;
    json_error_t jerr;
    json_t *root = json_load_file(argv[2], 0, &jerr);
    if (!root) {
        fprintf(stderr, "%s: %s\n", argv[2], jerr.text);
        return 1;
    }
    json_t *cases = json_object_get(root, "cases");
    size_t n = json_array_size(cases);
    const char **texts = calloc(n, sizeof *texts);
    for (size_t i = 0; i < n; i++) texts[i] = json_string_value(json_object_get(json_array_get(cases, i), "text"));
    lora_ctx *ctx = NULL;
    if (lora_ctx_create(LORA_ABI_VERSION, &ctx) != LORA_OK) return 1;
    int32_t ids[231];
    size_t got;
    static const struct { const char *name; int32_t flavour, max_len; } runs[] = {
        {"sd1_75", LORA_TOKENIZER_SD1, 75}, {"sd1_225", LORA_TOKENIZER_SD1, 225},
        {"sd2_75", LORA_TOKENIZER_SD2, 75}, {"sd2_225", LORA_TOKENIZER_SD2, 225},
    };
    for (size_t r = 0; r < sizeof runs / sizeof *runs; r++) {
        lora_tokenizer *tok = NULL;
        if (lora_tokenizer_create(ctx, runs[r].flavour, &tok) != LORA_OK) return 1;
        for (size_t i = 0; i < n; i++) lora_tokenizer_encode(tok, texts[i], runs[r].max_len, ids, 231, &got);
        double t = bench_now();
        for (int k = 0; k < reps; k++)
            for (size_t i = 0; i < n; i++)
                if (lora_tokenizer_encode(tok, texts[i], runs[r].max_len, ids, 231, &got) != LORA_OK) {
                    fprintf(stderr, "%s: %s\n", runs[r].name, lora_errmsg(ctx));
                    return 1;
                }
        t = bench_now() - t;
        printf("%s %.0f\n", runs[r].name, (double)reps * (double)n / t);
        lora_tokenizer_free(tok);
    }
    /* cold: create + one pass, as a one-shot `lora tokenize` does */
    int cold = reps < 20 ? reps : 20;
    double t = bench_now();
    for (int k = 0; k < cold; k++) {
        lora_tokenizer *tok = NULL;
        if (lora_tokenizer_create(ctx, LORA_TOKENIZER_SD1, &tok) != LORA_OK) return 1;
        for (size_t i = 0; i < n; i++) lora_tokenizer_encode(tok, texts[i], 75, ids, 231, &got);
        lora_tokenizer_free(tok);
    }
    t = bench_now() - t;
    printf("sd1_75_cold %.0f\n", (double)cold * (double)n / t);
    printf("# %zu prompts, %d passes, single thread; create+free+one pass: %.2f ms\n", n, reps, 1e3 * t / cold);
    lora_ctx_free(ctx);
    free(texts);
    json_decref(root);
    return 0;
}
