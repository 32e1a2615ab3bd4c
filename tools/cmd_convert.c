/* `lora convert IN OUT`: Stable Diffusion checkpoints between .safetensors, .ckpt and
 * diffusers folders, optionally casting (--save_precision), as kohya's
 * convert_diffusers20_original_sd.py does. */
#include <stdio.h>
#include <string.h>

#include "cli.h"

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static int32_t report(void *user, lora_phase phase, int64_t done, int64_t total, double value) {
    (void)user; (void)value;
    fprintf(stderr, "lora: %s %lld/%lld\n", phase == LORA_PHASE_LOAD ? "load" : "save", (long long)done, (long long)total);
    return 0;
}

int cmd_convert(lora_ctx *ctx, int argc, char **argv) {
    const char *in = NULL, *out = NULL;
    lora_params *p = NULL;
    lora_status s = lora_params_create(ctx, &p);
    if (s != LORA_OK) return cli_fail(ctx, s, "convert");
    int have_as = 0, rc = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--verbose") == 0) continue;
        if (strcmp(a, "--v2") == 0 || strcmp(a, "--v_parameterization") == 0) {
            s = lora_params_parse(p, a, "1");
        } else if (strcmp(a, "--save_precision") == 0 || strcmp(a, "--save_model_as") == 0) {
            if (i + 1 >= argc) {
                fprintf(stderr, "lora convert: %s needs a value\n", a);
                rc = 2;
                goto done;
            }
            have_as |= strcmp(a, "--save_model_as") == 0;
            s = lora_params_parse(p, a, argv[++i]);
        } else if (a[0] == '-' && a[1] == '-') {
            fprintf(stderr, "lora convert: unknown option '%s'\n", a);
            rc = 2;
            goto done;
        } else if (!in) {
            in = a;
        } else if (!out) {
            out = a;
        } else {
            fprintf(stderr, "lora convert: too many arguments\n");
            rc = 2;
            goto done;
        }
        if (s != LORA_OK) {
            rc = cli_fail(ctx, s, "convert");
            goto done;
        }
    }
    if (!in || !out) {
        fprintf(stderr, "usage: lora convert IN OUT [--save_model_as ckpt|safetensors|diffusers|diffusers_safetensors]\n"
                        "                   [--save_precision float|fp16|bf16] [--v2] [--v_parameterization]\n"
                        "  without --save_model_as: OUT ending in .ckpt/.pt -> ckpt, .safetensors -> safetensors,\n"
                        "  anything else -> a diffusers folder with .safetensors weights\n");
        rc = 2;
        goto done;
    }
    if (!have_as) {
        const char *as = (ends_with(out, ".ckpt") || ends_with(out, ".pt")) ? "ckpt"
                       : ends_with(out, ".safetensors") ? "safetensors" : "diffusers_safetensors";
        lora_params_parse(p, "save_model_as", as);
    }
    lora_ctx_set_progress(ctx, report, NULL);
    lora_model *m = NULL;
    s = lora_model_load(ctx, in, p, &m);
    if (s != LORA_OK) {
        rc = cli_fail(ctx, s, "convert (load)");
        goto done;
    }
    s = lora_model_save(m, out, p);
    if (s != LORA_OK) rc = cli_fail(ctx, s, "convert (save)");
    else fprintf(stderr, "lora: wrote %s\n", out);
    lora_model_free(m);
done:
    lora_params_free(p);
    return rc;
}
