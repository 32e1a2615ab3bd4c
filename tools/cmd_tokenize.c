/* `lora tokenize [--v2] [--max_token_length 75|150|225] [--raw] TEXT...`: the token ids kohya's
 * sd-scripts feeds the text encoder for each TEXT, one line of space-separated ids per TEXT
 * (77 per chunk; --raw: every id of the text without BOS/EOS/padding/truncation). With no
 * TEXT, each line of standard input is one text. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

static void usage(void) {
    fprintf(stderr,
            "usage: lora tokenize [--v2] [--max_token_length 75|150|225] [--raw] [--] [TEXT...]\n"
            "  prints one line of token ids per TEXT (each line of stdin when no TEXT is given):\n"
            "  77 ids per 75 tokens of max_token_length (BOS, ids, EOS, padding: EOS for SD 1.x,\n"
            "  id 0 for SD 2.x with --v2), or with --raw every id without BOS/EOS/padding\n");
}

static int print_one(lora_ctx *ctx, lora_tokenizer *tok, const char *text, int32_t max_len, int raw,
                     int32_t **buf, size_t *cap) {
    size_t n = 0;
    lora_status s;
    if (raw) {
        s = lora_tokenizer_tokenize(tok, text, NULL, 0, &n);
        if (s == LORA_OK && n > *cap) {
            int32_t *p = realloc(*buf, n * sizeof *p);
            if (!p) {
                fprintf(stderr, "lora tokenize: out of memory\n");
                return 1;
            }
            *buf = p;
            *cap = n;
        }
        if (s == LORA_OK && n) s = lora_tokenizer_tokenize(tok, text, *buf, *cap, &n);
    } else {
        s = lora_tokenizer_encode(tok, text, max_len, *buf, *cap, &n);
    }
    if (s != LORA_OK) return cli_fail(ctx, s, "tokenize");
    for (size_t i = 0; i < n; i++) printf(i ? " %d" : "%d", (int)(*buf)[i]);
    printf("\n");
    return 0;
}

int cmd_tokenize(lora_ctx *ctx, int argc, char **argv) {
    int v2 = 0, raw = 0, first_text = argc, rc = 0;
    int32_t max_len = 75;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0) {
            first_text = i + 1;
            break;
        } else if (strcmp(a, "--verbose") == 0) {
            continue;
        } else if (strcmp(a, "--v2") == 0) {
            v2 = 1;
        } else if (strcmp(a, "--raw") == 0) {
            raw = 1;
        } else if (strcmp(a, "--max_token_length") == 0) {
            if (i + 1 >= argc) {
                fprintf(stderr, "lora tokenize: --max_token_length needs a value\n");
                return 2;
            }
            const char *v = argv[++i];
            if (strcmp(v, "75") == 0) max_len = 75;
            else if (strcmp(v, "150") == 0) max_len = 150;
            else if (strcmp(v, "225") == 0) max_len = 225;
            else {
                fprintf(stderr, "lora tokenize: --max_token_length must be 75, 150 or 225, not '%s'\n", v);
                return 2;
            }
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage();
            return 0;
        } else if (a[0] == '-' && a[1] == '-') {
            fprintf(stderr, "lora tokenize: unknown option '%s'\n", a);
            usage();
            return 2;
        } else {
            first_text = i;
            break;
        }
    }
    lora_tokenizer *tok = NULL;
    lora_status s = lora_tokenizer_create(ctx, v2 ? LORA_TOKENIZER_SD2 : LORA_TOKENIZER_SD1, &tok);
    if (s != LORA_OK) return cli_fail(ctx, s, "tokenize");
    size_t cap = 3 * 77;
    int32_t *buf = malloc(cap * sizeof *buf);
    if (!buf) {
        lora_tokenizer_free(tok);
        return 1;
    }
    if (first_text < argc) {
        for (int i = first_text; i < argc && rc == 0; i++) rc = print_one(ctx, tok, argv[i], max_len, raw, &buf, &cap);
    } else {
        char *line = NULL;
        size_t lcap = 0;
        ssize_t got;
        while (rc == 0 && (got = getline(&line, &lcap, stdin)) >= 0) {
            if (got > 0 && line[got - 1] == '\n') line[got - 1] = 0;
            rc = print_one(ctx, tok, line, max_len, raw, &buf, &cap);
        }
        free(line);
    }
    free(buf);
    lora_tokenizer_free(tok);
    return rc;
}
