/* `lora train`: kohya-ss train_network.py's command line (its flag names, any key of the
 * parameter table as --name value), a progress bar with loss and ETA on stderr, the loss
 * curve on stdout at the end, and Ctrl-C: cancel, save a resumable state, say how to resume. */
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <lora/lora.h>

#include "cli.h"

#define CURVE_MAX 4096

static lora_ctx *g_ctx;   /* for the SIGINT handler: lora_ctx_cancel is one atomic store */
static volatile sig_atomic_t g_interrupted;

static void on_sigint(int sig) {
    (void)sig;
    g_interrupted = 1;
    if (g_ctx) lora_ctx_cancel(g_ctx);
}

struct progress {
    struct timespec t0;
    int64_t first_done;       /* step at the first report (resume) */
    int64_t n;                /* curve points */
    double loss[CURVE_MAX];
    int64_t step[CURVE_MAX];
    double sum;
    int64_t cnt, every, total;
    int bar;                  /* stderr is a terminal */
};

static double elapsed(const struct timespec *t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)(t.tv_sec - t0->tv_sec) + 1e-9 * (double)(t.tv_nsec - t0->tv_nsec);
}

static void fmt_time(char *b, size_t cap, double s) {
    if (!(s >= 0) || s > 1e7) { snprintf(b, cap, "?"); return; }
    long v = (long)(s + 0.5);
    if (v >= 3600) snprintf(b, cap, "%ld:%02ld:%02ld", v / 3600, v / 60 % 60, v % 60);
    else snprintf(b, cap, "%ld:%02ld", v / 60, v % 60);
}

static int32_t on_progress(void *user, lora_phase phase, int64_t done, int64_t total, double value) {
    struct progress *p = user;
    if (phase == LORA_PHASE_CACHE_LATENTS) {
        if (done == 0) fprintf(stderr, "caching latents...\n");
        return 0;
    }
    if (phase != LORA_PHASE_TRAIN_STEP) return 0;
    if (p->first_done < 0) {
        p->first_done = done - 1;
        clock_gettime(CLOCK_MONOTONIC, &p->t0);
        p->total = total;
        p->every = total / 20 > 0 ? total / 20 : 1;
    }
    /* loss curve: mean loss of each `every` steps */
    p->sum += value;
    p->cnt++;
    if ((done % p->every == 0 || done == total) && p->n < CURVE_MAX) {
        p->loss[p->n] = p->sum / (double)p->cnt;
        p->step[p->n] = done;
        p->n++;
        p->sum = 0;
        p->cnt = 0;
    }
    double el = elapsed(&p->t0), per = (done - p->first_done) > 0 ? el / (double)(done - p->first_done) : 0;
    char eta[32], spent[32];
    fmt_time(eta, sizeof eta, per * (double)(total - done));
    fmt_time(spent, sizeof spent, el);
    int width = 30, fill = total > 0 ? (int)((double)width * (double)done / (double)total) : 0;
    char bar[64];
    for (int i = 0; i < width; i++) bar[i] = i < fill ? '#' : '.';
    bar[width] = 0;
    if (p->bar || done == total || done % p->every == 0)
        fprintf(stderr, "%ssteps %lld/%lld [%s] loss %.4f  %.2f s/step  %s < %s%s", p->bar ? "\r" : "", (long long)done,
                (long long)total, bar, value, per, spent, eta, p->bar ? "   " : "\n");
    if (p->bar && done == total) fputc('\n', stderr);
    return 0;
}

/* kohya store_true flags: "--flag" alone means 1 */
static int is_flag_param(const char *name) {
    lora_param key;
    lora_param_type type;
    double lo = 0, hi = 0;
    if (lora_param_lookup(name, &key, &type) != LORA_OK || type != LORA_PARAM_INT) return 0;
    if (lora_param_bounds(key, &lo, &hi, NULL) != LORA_OK) return 0;
    return lo == 0 && hi == 1;
}

static void usage(void) {
    fprintf(stderr,
            "usage: lora train --pretrained_model_name_or_path MODEL --train_data_dir DIR --output_dir OUT\n"
            "                  [--output_name NAME] [--reg_data_dir DIR] [--network_module networks.lora]\n"
            "                  [--network_dim N] [--network_alpha A] [--network_weights FILE]\n"
            "                  [--learning_rate LR] [--unet_lr LR] [--text_encoder_lr LR]\n"
            "                  [--max_train_steps N | --max_train_epochs N] [--train_batch_size N]\n"
            "                  [--resolution W[,H]] [--enable_bucket] [--caption_extension .txt]\n"
            "                  [--optimizer_type AdamW|AdamW8bit|SGDNesterov|Lion] [--optimizer_args k=v ...]\n"
            "                  [--lr_scheduler NAME] [--lr_warmup_steps N] [--mixed_precision no|fp16|bf16]\n"
            "                  [--save_every_n_epochs N] [--save_model_as safetensors|ckpt|pt]\n"
            "                  [--save_precision float|fp16|bf16] [--seed N] [--save_state] [--resume STATE]\n"
            "                  [--threads N] ... (any training option by its kohya name)\n");
}

int cmd_train(lora_ctx *ctx, int argc, char **argv) {
    lora_params *p = NULL;
    lora_status s = lora_params_create(ctx, &p);
    if (s != LORA_OK) return cli_fail(ctx, s, "options");
    int threads = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--verbose") == 0) continue;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage();
            lora_params_free(p);
            return 0;
        }
        if (strncmp(a, "--", 2) != 0) {
            fprintf(stderr, "lora train: unexpected argument '%s'\n", a);
            usage();
            lora_params_free(p);
            return 2;
        }
        const char *name = a + 2;
        if (strcmp(name, "caption_extention") == 0) name = "caption_extension";   /* kohya's misspelled alias */
        const char *next = i + 1 < argc ? argv[i + 1] : NULL;
        int has_value = next && strncmp(next, "--", 2) != 0;
        /* kohya flags that do not change the result here */
        static const char *const noop_flags[] = {"xformers", "mem_eff_attn", "lowram", "persistent_data_loader_workers"};
        static const char *const noop_values[] = {"max_data_loader_n_workers", "logging_dir", "log_prefix"};
        int skip = 0;
        for (size_t k = 0; k < sizeof noop_flags / sizeof noop_flags[0]; k++)
            if (strcmp(name, noop_flags[k]) == 0) skip = 1;
        for (size_t k = 0; k < sizeof noop_values / sizeof noop_values[0]; k++)
            if (strcmp(name, noop_values[k]) == 0 && has_value) skip = 2;
        if (skip) {
            fprintf(stderr, "lora train: --%s has no effect here (ignored)\n", name);
            i += skip - 1;
            continue;
        }
        if (strcmp(name, "threads") == 0 && has_value) {
            threads = atoi(next);
            i++;
            continue;
        }
        if (strcmp(name, "use_8bit_adam") == 0) {
            s = lora_params_set_string(p, LORA_P_OPTIMIZER_TYPE, "AdamW8bit");
        } else if (strcmp(name, "optimizer_args") == 0) {
            /* nargs='*': every following word up to the next option */
            char buf[1024] = "";
            size_t n = 0;
            while (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0) {
                int w = snprintf(buf + n, sizeof buf - n, "%s%s", n ? " " : "", argv[++i]);
                if (w < 0 || (size_t)w >= sizeof buf - n) break;
                n += (size_t)w;
            }
            s = lora_params_set_string(p, LORA_P_OPTIMIZER_ARGS, buf);
        } else if (is_flag_param(name) && !has_value) {
            s = lora_params_parse(p, name, "1");
        } else if (has_value) {
            s = lora_params_parse(p, name, next);
            i++;
        } else {
            fprintf(stderr, "lora train: option --%s needs a value\n", name);
            lora_params_free(p);
            return 2;
        }
        if (s != LORA_OK) {
            int rc = cli_fail(ctx, s, a);
            lora_params_free(p);
            return s == LORA_E_UNKNOWN_KEY ? 2 : rc;
        }
    }
    char model_path[4096] = "", out_dir[4096] = "", out_name[1024] = "";
    lora_params_get_string(p, LORA_P_PRETRAINED_MODEL_NAME_OR_PATH, model_path, sizeof model_path, NULL);
    lora_params_get_string(p, LORA_P_OUTPUT_DIR, out_dir, sizeof out_dir, NULL);
    lora_params_get_string(p, LORA_P_OUTPUT_NAME, out_name, sizeof out_name, NULL);
    if (!model_path[0] || !out_dir[0]) {
        fprintf(stderr, "lora train: --pretrained_model_name_or_path and --output_dir are required\n");
        usage();
        lora_params_free(p);
        return 2;
    }
    if (threads > 0) lora_ctx_set_threads(ctx, threads);
    lora_model *model = NULL;
    lora_network *net = NULL;
    lora_trainer *tr = NULL;
    int rc = 0;
    if ((s = lora_model_load(ctx, model_path, p, &model)) != LORA_OK) rc = cli_fail(ctx, s, model_path);
    if (!rc && (s = lora_network_create(model, p, &net)) != LORA_OK) rc = cli_fail(ctx, s, "network");
    struct progress *pr = calloc(1, sizeof *pr);
    if (!rc && !pr) rc = cli_fail(ctx, LORA_E_NOMEM, "progress");
    if (!rc) {
        pr->first_done = -1;
        pr->bar = isatty(2);
        lora_ctx_set_progress(ctx, on_progress, pr);
        g_ctx = ctx;
        signal(SIGINT, on_sigint);
        s = lora_trainer_create(model, net, p, &tr);
        if (s == LORA_E_CANCELLED) {
            fprintf(stderr, "lora train: interrupted before the first step; nothing to save\n");
            rc = 130;
        } else if (s != LORA_OK) {
            rc = cli_fail(ctx, s, "lora train");
        }
    }
    if (!rc) {
        int64_t steps = 0, epochs = 0, bpe = 0;
        lora_trainer_get_int(tr, LORA_STAT_MAX_STEPS, &steps);
        lora_trainer_get_int(tr, LORA_STAT_EPOCHS, &epochs);
        lora_trainer_get_int(tr, LORA_STAT_BATCHES_PER_EPOCH, &bpe);
        fprintf(stderr, "training: %lld steps, %lld epochs of %lld batches\n", (long long)steps, (long long)epochs,
                (long long)bpe);
        s = lora_trainer_run(tr);
        if (s == LORA_E_CANCELLED || g_interrupted) {
            if (pr->bar) fputc('\n', stderr);
            char state[4096 + 1100];
            int64_t at = 0;
            lora_trainer_get_int(tr, LORA_STAT_STEP, &at);
            snprintf(state, sizeof state, "%s/%s-step%08lld-state.safetensors", out_dir, out_name[0] ? out_name : "last",
                     (long long)at);
            /* kohya makes it (with parents) on the first save; maybe none happened yet */
            cli_mkdirs(out_dir);   /* a failure shows in the save below */
            lora_status ss = lora_trainer_save_state(tr, state);
            if (ss == LORA_OK)
                fprintf(stderr, "lora train: interrupted at step %lld; state saved to %s\n"
                                "  resume with the same options plus: --resume '%s'\n", (long long)at, state, state);
            else
                cli_fail(ctx, ss, "saving the state");
            rc = 130;
        } else if (s != LORA_OK) {
            rc = cli_fail(ctx, s, "lora train");
        } else {
            double avg = 0;
            lora_trainer_get_float(tr, LORA_STAT_AVG_LOSS, &avg);
            printf("loss curve (mean loss per %lld steps):\n", (long long)pr->every);
            double lo = INFINITY, hi = -INFINITY;
            for (int64_t i = 0; i < pr->n; i++) {
                if (pr->loss[i] < lo) lo = pr->loss[i];
                if (pr->loss[i] > hi) hi = pr->loss[i];
            }
            for (int64_t i = 0; i < pr->n; i++) {
                int w = hi > lo ? (int)(40.0 * (pr->loss[i] - lo) / (hi - lo) + 0.5) : 0;
                printf("  step %6lld  loss %.5f  |%.*s\n", (long long)pr->step[i], pr->loss[i], w,
                       "########################################");
            }
            printf("final average loss %.5f; saved %s/%s.", avg, out_dir, out_name[0] ? out_name : "last");
            char ext[32] = "";
            lora_params_get_string(p, LORA_P_SAVE_MODEL_AS, ext, sizeof ext, NULL);
            printf("%s\n", ext);
        }
    }
    signal(SIGINT, SIG_DFL);
    g_ctx = NULL;
    lora_ctx_set_progress(ctx, NULL, NULL);
    lora_trainer_free(tr);
    lora_network_free(net);
    lora_model_free(model);
    lora_params_free(p);
    free(pr);
    return rc;
}
