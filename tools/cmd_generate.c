/* `lora generate`: kohya-ss gen_img_diffusers.py's txt2img / img2img with LoRA networks
 * (--network_module/--network_weights/--network_mul, --network_merge), kohya's flag names,
 * --prompt or --from_file lines with their inline " --" options, kohya's seeds and file names,
 * PNGs with A1111's "parameters" and kohya's text chunks (or JPEG/WebP with "parameters" as
 * A1111's EXIF UserComment: --output_format), A1111's "Model hash" (first 10 hex of the
 * checkpoint's SHA-256) and "Lora hashes", a progress bar on stderr. */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>

#include <lora/lora.h>

#include "cli.h"


#define MAX_NETS 16

/* ---- Python's random (kohya seeds with random.seed(S) + randint(0, 2^31 - 1)) ---------- */
struct pyrand {
    uint32_t mt[624];
    int idx;
};

static void pr_init_genrand(struct pyrand *r, uint32_t s) {
    r->mt[0] = s;
    for (int i = 1; i < 624; i++) r->mt[i] = 1812433253u * (r->mt[i - 1] ^ (r->mt[i - 1] >> 30)) + (uint32_t)i;
    r->idx = 624;
}

static void pr_seed(struct pyrand *r, uint64_t seed) {
    uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    int klen = key[1] ? 2 : 1, i = 1, j = 0;
    pr_init_genrand(r, 19650218u);
    uint32_t *mt = r->mt;
    for (int k = 624; k; k--) {
        mt[i] = (mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1664525u)) + key[j] + (uint32_t)j;
        if (++i >= 624) { mt[0] = mt[623]; i = 1; }
        if (++j >= klen) j = 0;
    }
    for (int k = 623; k; k--) {
        mt[i] = (mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1566083941u)) - (uint32_t)i;
        if (++i >= 624) { mt[0] = mt[623]; i = 1; }
    }
    mt[0] = 0x80000000u;
}

static uint32_t pr_next(struct pyrand *r) {
    if (r->idx >= 624) {
        for (int i = 0; i < 624; i++) {
            uint32_t y = (r->mt[i] & 0x80000000u) | (r->mt[(i + 1) % 624] & 0x7fffffffu);
            uint32_t v = r->mt[(i + 397) % 624] ^ (y >> 1);
            if (y & 1u) v ^= 0x9908b0dfu;
            r->mt[i] = v;
        }
        r->idx = 0;
    }
    uint32_t y = r->mt[r->idx++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

static uint32_t pr_randint31(struct pyrand *r) {
    for (;;) {
        uint32_t v = pr_next(r);
        if (v < 0x80000000u) return v;
    }
}

/* ---- progress bar -------------------------------------------------------------------------- */
struct bar {
    int active;
};

static int on_progress(void *user, lora_phase phase, int64_t done, int64_t total, double value) {
    (void)value;
    struct bar *b = user;
    if (phase != LORA_PHASE_SAMPLE_STEP && phase != LORA_PHASE_DECODE) return 0;
    int width = 30, fill = total > 0 ? (int)(width * done / total) : 0;
    char line[64];
    memset(line, '#', (size_t)fill);
    memset(line + fill, '.', (size_t)(width - fill));
    line[width] = '\0';
    fprintf(stderr, "\r%-8s [%s] %lld/%lld", phase == LORA_PHASE_DECODE ? "decode" : "sampling", line,
            (long long)done, (long long)total);
    b->active = 1;
    if (done >= total) fprintf(stderr, "\n");
    return 0;
}

/* ---- prompt lines: kohya's " --" options ---------------------------------------------------- */
struct line_opts {
    char *prompt;
    const char *negative;
    long w, h, steps;
    double scale, negative_scale, strength;
    int has_scale, has_nl, nl_none, has_strength;
    uint64_t seeds[256];
    int n_seeds;
    double muls[MAX_NETS];
    int n_muls;
};

static char *trim(char *s) {
    while (*s == ' ' || *s == '\t' || *s == '\r' || *s == '\n') s++;
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r' || s[n - 1] == '\n')) s[--n] = '\0';
    return s;
}

/* "opt value": kohya's re.match(r'opt (...)', part, re.IGNORECASE) */
static const char *opt_value(const char *part, const char *opt) {
    size_t n = strlen(opt);
    if (strncasecmp(part, opt, n) != 0 || part[n] != ' ') return NULL;
    return part + n + 1;
}

static void parse_line(char *line, struct line_opts *o) {
    memset(o, 0, sizeof *o);
    line = trim(line);
    o->prompt = line;
    char *sep = strstr(line, " --");
    if (sep) *sep = '\0';
    while (sep) {
        char *part = sep + 3;
        sep = strstr(part, " --");
        if (sep) *sep = '\0';
        const char *v;
        if ((v = opt_value(part, "w"))) o->w = strtol(v, NULL, 10);
        else if ((v = opt_value(part, "h"))) o->h = strtol(v, NULL, 10);
        else if ((v = opt_value(part, "s"))) {
            o->steps = strtol(v, NULL, 10);
            if (o->steps < 1) o->steps = 1;
            if (o->steps > 1000) o->steps = 1000;
        } else if ((v = opt_value(part, "d"))) {
            while (*v && o->n_seeds < 256) {
                o->seeds[o->n_seeds++] = strtoull(v, (char **)&v, 10);
                if (*v != ',') break;
                v++;
            }
        } else if ((v = opt_value(part, "l"))) {
            o->scale = strtod(v, NULL);
            o->has_scale = 1;
        } else if ((v = opt_value(part, "nl"))) {
            o->has_nl = 1;
            if (strncasecmp(v, "none", 4) == 0) o->nl_none = 1;
            else o->negative_scale = strtod(v, NULL);
        } else if ((v = opt_value(part, "t"))) {
            o->strength = strtod(v, NULL);
            o->has_strength = 1;
        } else if ((v = opt_value(part, "n"))) {
            o->negative = v;
        } else if ((v = opt_value(part, "am"))) {
            while (*v && o->n_muls < MAX_NETS) {
                char *end;
                o->muls[o->n_muls++] = strtod(v, &end);
                if (*end != ',') break;
                v = end + 1;
            }
        } else {
            fprintf(stderr, "lora generate: ignoring prompt option '--%s'\n", part);
        }
    }
}

static char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = len >= 0 ? malloc((size_t)len + 1) : NULL;
    if (b && fread(b, 1, (size_t)len, f) != (size_t)len) {
        free(b);
        b = NULL;
    }
    fclose(f);
    if (b) b[len] = '\0';
    *n = b ? (size_t)len : 0;
    return b;
}

static const char *base_name(const char *p) {
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

static void usage(void) {
    fprintf(stderr,
            "usage: lora generate --ckpt MODEL (--prompt TEXT | --from_file FILE) [--outdir DIR]\n"
            "         [--W 512] [--H 512] [--steps 50] [--scale 7.5] [--negative_scale X] [--sampler ddim]\n"
            "         [--seed S] [--iter_same_seed] [--images_per_prompt N] [--batch_size B] [--n_iter N]\n"
            "         [--negative_prompt TEXT] [--clip_skip N] [--max_embeddings_multiples M]\n"
            "         [--v2] [--v_parameterization] [--rng cpu|cuda] [--clip_sample]\n"
            "         [--image_path IMG --strength 0.8] [--sequential_file_name]\n"
            "         [--network_module networks.lora ...] [--network_weights F ...] [--network_mul M ...]\n"
            "         [--network_merge] [--output_format png|jpg|webp] [--jpeg_quality 80] [--webp_lossless]\n"
            "         [--no_model_hash]\n"
            "  --W/--H: multiples of 8 (--image_path: the image's size, rounded down to multiples of 32)\n"
            "  samplers: ddim pndm lms euler euler_a heun dpm_2 dpm_2_a dpmsolver dpmsolver++ dpmsingle\n"
            "            k_lms k_euler k_euler_a k_dpm_2 k_dpm_2_a\n"
            "  prompt options after \" --\": --n NEG --w W --h H --s STEPS --d SEED[,SEED] --l SCALE\n"
            "            --nl NEGSCALE|none --t STRENGTH --am MUL[,MUL]\n");
}

int cmd_generate(lora_ctx *ctx, int argc, char **argv) {
    const char *ckpt = NULL, *outdir = "outputs", *prompt = NULL, *from_file = NULL, *negative = NULL;
    const char *sampler = "ddim", *rng = "cpu", *image_path = NULL, *vae = NULL, *out_fmt = "png";
    const char *weights[MAX_NETS];
    double muls[MAX_NETS];
    int nw = 0, nmul = 0, v2 = 0, vparam = 0, merge = 0, iter_same = 0, seq_names = 0, clip_sample = 0;
    int no_model_hash = 0, webp_lossless = 0;
    long jpeg_quality = 80;   /* A1111's default, used for JPEG and lossy WebP as A1111 does */
    long W = 512, H = 512, steps = 50, ipp = 1, batch = 1, n_iter = 1, clip_skip = 1, mem = 1;
    double scale = 7.5, negative_scale = 0, strength = 0.8;
    long long seed = -1;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        int more = i + 1 < argc;
#define STR(flag, var) else if (strcmp(a, flag) == 0 && more) var = argv[++i]
#define LNG(flag, var) else if (strcmp(a, flag) == 0 && more) var = strtol(argv[++i], NULL, 10)
#define DBL(flag, var) else if (strcmp(a, flag) == 0 && more) var = strtod(argv[++i], NULL)
        if (0) {}
        STR("--ckpt", ckpt); STR("--outdir", outdir); STR("--prompt", prompt); STR("--from_file", from_file);
        STR("--negative_prompt", negative); STR("--sampler", sampler); STR("--rng", rng);
        STR("--image_path", image_path); STR("--vae", vae); STR("--output_format", out_fmt);
        LNG("--jpeg_quality", jpeg_quality);
        LNG("--W", W); LNG("--H", H); LNG("--steps", steps); LNG("--images_per_prompt", ipp);
        LNG("--batch_size", batch); LNG("--n_iter", n_iter); LNG("--clip_skip", clip_skip);
        LNG("--max_embeddings_multiples", mem);
        DBL("--scale", scale); DBL("--negative_scale", negative_scale); DBL("--strength", strength);
        else if (strcmp(a, "--seed") == 0 && more) seed = strtoll(argv[++i], NULL, 10);
        else if (strcmp(a, "--v2") == 0) v2 = 1;
        else if (strcmp(a, "--v_parameterization") == 0) vparam = 1;
        else if (strcmp(a, "--network_merge") == 0) merge = 1;
        else if (strcmp(a, "--iter_same_seed") == 0) iter_same = 1;
        else if (strcmp(a, "--sequential_file_name") == 0) seq_names = 1;
        else if (strcmp(a, "--clip_sample") == 0) clip_sample = 1;
        else if (strcmp(a, "--no_model_hash") == 0) no_model_hash = 1;
        else if (strcmp(a, "--webp_lossless") == 0) webp_lossless = 1;
        else if (strcmp(a, "--verbose") == 0) continue;
        else if (strcmp(a, "--network_module") == 0) {
            while (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0) {
                if (strcmp(argv[++i], "networks.lora") != 0) {
                    fprintf(stderr, "lora generate: network module '%s' is not supported (networks.lora only)\n",
                            argv[i]);
                    return 2;
                }
            }
        } else if (strcmp(a, "--network_weights") == 0) {
            while (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0 && nw < MAX_NETS) weights[nw++] = argv[++i];
        } else if (strcmp(a, "--network_mul") == 0) {
            while (i + 1 < argc && nmul < MAX_NETS) {
                char *end;
                double m = strtod(argv[i + 1], &end);
                if (*end || end == argv[i + 1]) break;
                muls[nmul++] = m;
                i++;
            }
        } else {
            fprintf(stderr, "lora generate: unknown or incomplete option '%s'\n", a);
            usage();
            return 2;
        }
#undef STR
#undef LNG
#undef DBL
    }
    if (!ckpt || (!prompt && !from_file) || ipp < 1 || batch < 1 || n_iter < 1) {
        usage();
        return 2;
    }
    for (int i = nmul; i < nw; i++) muls[i] = 1.0;   /* kohya: default 1.0 each */
    const char *ext = NULL;
    if (strcasecmp(out_fmt, "png") == 0) ext = "png";
    else if (strcasecmp(out_fmt, "jpg") == 0 || strcasecmp(out_fmt, "jpeg") == 0) ext = "jpg";
    else if (strcasecmp(out_fmt, "webp") == 0) ext = "webp";
    if (!ext || jpeg_quality < 1 || jpeg_quality > 100) {
        fprintf(stderr, "lora generate: --output_format must be png, jpg or webp and --jpeg_quality 1..100\n");
        return 2;
    }

    /* prompts */
    char *file_text = NULL;
    char *lines[4096];
    int n_lines = 0;
    if (from_file) {
        size_t n = 0;
        file_text = slurp(from_file, &n);
        if (!file_text) {
            fprintf(stderr, "lora generate: cannot read %s: %s\n", from_file, strerror(errno));
            return 1;
        }
        for (char *l = strtok(file_text, "\n"); l && n_lines < 4096; l = strtok(NULL, "\n"))
            if (*trim(l)) lines[n_lines++] = l;
    } else {
        file_text = strdup(prompt);
        lines[n_lines++] = file_text;
    }
    if (cli_mkdirs(outdir) != 0) {   /* os.makedirs(outdir, exist_ok=True) as kohya */
        fprintf(stderr, "lora generate: cannot create %s: %s\n", outdir, strerror(errno));
        free(file_text);
        return 1;
    }

    int rc = 0;
    lora_status s;
    lora_params *load = NULL, *p = NULL;
    lora_model *model = NULL;
    lora_network *nets[MAX_NETS] = {0};
    struct bar bar = {0};
    lora_params_create(ctx, &load);
    lora_params_set_int(load, LORA_P_V2, v2);
    lora_params_set_int(load, LORA_P_V_PARAMETERIZATION, vparam);
    if ((s = lora_model_load(ctx, ckpt, load, &model)) != LORA_OK) rc = cli_fail(ctx, s, ckpt);
    /* A1111's "Model hash": the first 10 hex of the checkpoint file's SHA-256 (a Diffusers
     * folder has none; A1111 does not load those) */
    char model_hash[65] = "";
    struct stat ckpt_st;
    if (!rc && !no_model_hash && stat(ckpt, &ckpt_st) == 0 && S_ISREG(ckpt_st.st_mode)) {
        if ((s = lora_file_hash(ctx, ckpt, LORA_HASH_SHA256, model_hash, sizeof model_hash)) != LORA_OK)
            rc = cli_fail(ctx, s, ckpt);
        model_hash[10] = '\0';
    }
    char lora_hashes[2048] = "";
    for (int i = 0; !rc && i < nw; i++) {
        if ((s = lora_network_load(ctx, weights[i], &nets[i])) != LORA_OK) {
            rc = cli_fail(ctx, s, weights[i]);
            break;
        }
        if ((s = lora_model_attach(model, nets[i], muls[i], merge ? LORA_APPLY_MERGE : LORA_APPLY_RUNTIME)) != LORA_OK)
            rc = cli_fail(ctx, s, weights[i]);
        /* A1111's "Lora hashes": the first 12 hex digits of the file's sshs_model_hash, else of
         * the hash A1111 computes itself: the addnet hash of a .safetensors file, the SHA-256 of
         * any other */
        char h[80] = "";
        size_t need = 0;
        if (!rc && (lora_network_metadata_get(nets[i], "sshs_model_hash", h, sizeof h, &need) != LORA_OK ||
                    strlen(h) < 12)) {
            size_t wl = strlen(weights[i]);
            int st = wl >= 12 && strcasecmp(weights[i] + wl - 12, ".safetensors") == 0;
            if ((s = lora_file_hash(ctx, weights[i], st ? LORA_HASH_ADDNET : LORA_HASH_SHA256, h, sizeof h)) !=
                LORA_OK)
                rc = cli_fail(ctx, s, weights[i]);
        }
        if (!rc && strlen(h) >= 12) {
            char name[256];
            snprintf(name, sizeof name, "%s", base_name(weights[i]));
            char *dot = strrchr(name, '.');
            if (dot) *dot = '\0';
            size_t k = strlen(lora_hashes);
            snprintf(lora_hashes + k, sizeof lora_hashes - k, "%s%s: %.12s", k ? ", " : "", name, h);
        }
    }
    if (!rc) {
        lora_ctx_set_progress(ctx, on_progress, &bar);
        if ((s = lora_params_create(ctx, &p)) != LORA_OK) rc = cli_fail(ctx, s, "options");
    }
    /* kohya: with --seed, random.seed(S) and n_iter * prompts * images_per_prompt seeds (S itself
     * for a single image); prompts take theirs from the end of the list */
    int64_t n_pre = n_iter * n_lines * ipp;
    uint64_t *pre = calloc((size_t)n_pre, sizeof *pre);
    struct pyrand pr;
    pr_seed(&pr, 0);
    if (seed >= 0) {
        pr_seed(&pr, (uint64_t)seed);
        for (int64_t i = 0; i < n_pre; i++) pre[i] = pr_randint31(&pr);
        if (n_pre == 1) pre[0] = (uint64_t)seed;
    } else {
        uint64_t r = 0;
        if (getrandom(&r, sizeof r, 0) != (ssize_t)sizeof r) r = (uint64_t)time(NULL);
        pr_seed(&pr, r);
    }
    int64_t pre_left = n_pre, counter = 0;
    for (long it = 0; !rc && it < n_iter; it++) {
        uint64_t iter_seed = pr_randint31(&pr);
        for (int li = 0; !rc && li < n_lines; li++) {
            char *copy = strdup(lines[li]);
            struct line_opts o;
            parse_line(copy, &o);
            uint64_t seeds[256];
            int ns = (int)(ipp < 256 ? ipp : 256);
            if (o.n_seeds) {
                for (int k = 0; k < ns; k++) seeds[k] = o.seeds[k % o.n_seeds];
            } else if (seed >= 0) {
                for (int k = 0; k < ns; k++) seeds[k] = pre[pre_left - ns + k];
                pre_left -= ns;
            } else {
                for (int k = 0; k < ns; k++) seeds[k] = iter_same ? iter_seed : pr_randint31(&pr);
            }
            char seed_list[256 * 21] = "";
            for (int k = 0; k < ns; k++) {
                size_t len = strlen(seed_list);
                snprintf(seed_list + len, sizeof seed_list - len, "%s%llu", k ? "," : "", (unsigned long long)seeds[k]);
            }
            for (int k = 0; !rc && k < nw && o.n_muls; k++) {
                double m = o.muls[k < o.n_muls ? k : o.n_muls - 1];
                if (merge) fprintf(stderr, "lora generate: --am needs networks attached at run time (no --network_merge)\n");
                else if ((s = lora_model_set_multiplier(model, nets[k], m)) != LORA_OK) rc = cli_fail(ctx, s, "--am");
            }
            lora_params_reset(p);
#define SET(call) do { if (!rc && (s = (call)) != LORA_OK) rc = cli_fail(ctx, s, "options"); } while (0)
            SET(lora_params_set_string(p, LORA_P_PROMPT, o.prompt));
            SET(lora_params_set_string(p, LORA_P_NEGATIVE_PROMPT, o.negative ? o.negative : negative ? negative : ""));
            SET(lora_params_set_int(p, LORA_P_W, o.w ? o.w : W));
            SET(lora_params_set_int(p, LORA_P_H, o.h ? o.h : H));
            SET(lora_params_set_int(p, LORA_P_STEPS, o.steps ? o.steps : steps));
            SET(lora_params_set_float(p, LORA_P_SCALE, o.has_scale ? o.scale : scale));
            SET(lora_params_set_float(p, LORA_P_NEGATIVE_SCALE, o.has_nl ? (o.nl_none ? 0 : o.negative_scale)
                                                                         : negative_scale));
            SET(lora_params_set_string(p, LORA_P_SAMPLER, sampler));
            SET(lora_params_set_string(p, LORA_P_RNG, rng));
            SET(lora_params_set_int(p, LORA_P_CLIP_SKIP, clip_skip));
            SET(lora_params_set_int(p, LORA_P_MAX_EMBEDDINGS_MULTIPLES, mem));
            SET(lora_params_set_int(p, LORA_P_CLIP_SAMPLE, clip_sample));
            SET(lora_params_set_int(p, LORA_P_IMAGES_PER_PROMPT, ns));
            SET(lora_params_set_int(p, LORA_P_BATCH_SIZE, batch));
            SET(lora_params_set_string(p, LORA_P_SEEDS, seed_list));
            if (image_path) {
                SET(lora_params_set_string(p, LORA_P_IMAGE_PATH, image_path));
                SET(lora_params_set_float(p, LORA_P_STRENGTH, o.has_strength ? o.strength : strength));
            }
            if (vae) SET(lora_params_set_string(p, LORA_P_VAE, vae));
            if (lora_hashes[0]) SET(lora_params_set_string(p, LORA_P_LORA_HASHES, lora_hashes));
            if (model_hash[0]) SET(lora_params_set_string(p, LORA_P_MODEL_HASH, model_hash));
            SET(lora_params_set_int(p, LORA_P_JPEG_QUALITY, jpeg_quality));
            SET(lora_params_set_int(p, LORA_P_WEBP_LOSSLESS, webp_lossless));
#undef SET
            lora_image *imgs[256] = {0};
            int64_t got = 0;
            if (!rc && (s = lora_generate_batch(model, p, imgs, 256, &got)) != LORA_OK) rc = cli_fail(ctx, s, "generate");
            char ts[32];
            time_t now = time(NULL);
            struct tm tmv;
            strftime(ts, sizeof ts, "%Y%m%d%H%M%S", localtime_r(&now, &tmv));
            for (int64_t k = 0; !rc && k < got; k++) {
                char path[4096];
                counter++;
                if (seq_names) snprintf(path, sizeof path, "%s/im_%06lld.%s", outdir, (long long)counter, ext);
                else snprintf(path, sizeof path, "%s/im_%s_%03lld_%llu.%s", outdir, ts, (long long)(k % batch),
                              (unsigned long long)lora_image_seed(imgs[k]), ext);
                if ((s = lora_image_save(imgs[k], path, p)) != LORA_OK) rc = cli_fail(ctx, s, path);
                else printf("%s\n", path);
            }
            for (int64_t k = 0; k < got; k++) lora_image_free(imgs[k]);
            free(copy);
        }
    }
    if (bar.active) fflush(stderr);
    free(pre);
    lora_params_free(p);
    lora_params_free(load);
    for (int i = 0; i < nw; i++) lora_network_free(nets[i]);
    lora_model_free(model);
    free(file_text);
    return rc;
}
