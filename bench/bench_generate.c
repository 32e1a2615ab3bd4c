/* lora_generate on an SD 1.5-shaped checkpoint (random weights, build-bench/sd15_random.safetensors
 * from bench/load_peer.py) on the CPU backend: seconds per CFG sampling step (U-Net batch 2:
 * negative + prompt), the VAE decode, peak memory, and the cost of a LoRA attached at run time
 * against the same LoRA merged (a rank-`dim` network on every kohya target, random factors),
 * as seconds per step and their ratio, with the peak memory after the runtime run (VmHWM: the
 * plain run's peak included). Steps are timed from the progress callback (the first
 * step, which includes the weight conversion, is left out). Prints "# ..." lines and
 * "name seconds"; scripts/bench.sh generate pairs them with bench/generate_peer.py (diffusers
 * StableDiffusionPipeline on PyTorch CPU). Not a test.
 * usage: bench_generate [steps] [size] [checkpoint] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lora/lora.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static unsigned long long vm_hwm_kb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    unsigned long long kb = 0;
    if (!f) return 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %llu", &kb) == 1) break;
    fclose(f);
    return kb;
}

struct timing {
    double start, step_first, step_last, decode_end;
    long long steps;
};

static int on_progress(void *user, lora_phase phase, int64_t done, int64_t total, double value) {
    (void)value;
    (void)total;
    struct timing *t = user;
    double n = now_s();
    if (phase == LORA_PHASE_SAMPLE_STEP) {
        if (done == 1) t->step_first = n;
        t->step_last = n;
        t->steps = done;
    } else if (phase == LORA_PHASE_DECODE) {
        t->decode_end = n;
    }
    return 0;
}

/* One image; returns seconds per step (steps 2..n) and sets *decode. */
static double run(lora_ctx *ctx, lora_model *model, lora_params *p, double *decode) {
    struct timing t;
    memset(&t, 0, sizeof t);
    lora_ctx_set_progress(ctx, on_progress, &t);
    t.start = now_s();
    lora_image *img = NULL;
    lora_status s = lora_generate(model, p, &img);
    lora_ctx_set_progress(ctx, NULL, NULL);
    if (s != LORA_OK) {
        fprintf(stderr, "bench_generate: %s\n", lora_errmsg(ctx));
        exit(1);
    }
    lora_image_free(img);
    if (decode) *decode = t.decode_end - t.step_last;
    return t.steps > 1 ? (t.step_last - t.step_first) / (double)(t.steps - 1) : t.step_last - t.start;
}

int main(int argc, char **argv) {
    int steps = argc > 1 ? atoi(argv[1]) : 3;
    int size = argc > 2 ? atoi(argv[2]) : 512;
    const char *ck = argc > 3 ? argv[3] : "build-bench/sd15_random.safetensors";
    if (steps < 2) steps = 2;
    lora_ctx *ctx = NULL;
    if (lora_ctx_create(LORA_ABI_VERSION, &ctx) != LORA_OK) return 1;
    lora_model *model = NULL;
    if (lora_model_load(ctx, ck, NULL, &model) != LORA_OK) {
        fprintf(stderr, "bench_generate: %s: %s (run bench/load_peer.py write build-bench)\n", ck, lora_errmsg(ctx));
        return 1;
    }
    lora_params *p = NULL;
    lora_params_create(ctx, &p);
    lora_params_set_string(p, LORA_P_PROMPT, "a photograph of an astronaut riding a horse, (masterpiece:1.2)");
    lora_params_set_string(p, LORA_P_NEGATIVE_PROMPT, "lowres, blurry");
    lora_params_set_int(p, LORA_P_STEPS, steps);
    lora_params_set_int(p, LORA_P_W, size);
    lora_params_set_int(p, LORA_P_H, size);
    lora_params_set_int(p, LORA_P_SEED, 1);
    lora_params_set_string(p, LORA_P_SAMPLER, "euler_a");
    printf("# lora_generate, SD1.5-shaped checkpoint %s (random weights), %dx%d, CFG 7.5 (U-Net batch 2), "
           "euler_a, %d steps per image, threads %s\n", ck, size, size, steps, getenv("OMP_NUM_THREADS") ?
           getenv("OMP_NUM_THREADS") : "default");
    double decode = 0;
    double step = run(ctx, model, p, &decode);
    printf("# peak RSS after the plain run: %.2f GiB\n", vm_hwm_kb() / 1048576.0);
    printf("gen_cfg_step %.3f\n", step);
    printf("gen_vae_decode %.3f\n", decode);

    /* a LoRA on every target: runtime (low-rank branches on the borrowed 16-bit weights, as
     * kohya's runtime forward) vs merged */
    lora_params *np = NULL;
    lora_params_create(ctx, &np);
    lora_params_set_int(np, LORA_P_NETWORK_DIM, 16);
    lora_params_set_float(np, LORA_P_NETWORK_ALPHA, 8);
    lora_network *net = NULL;
    if (lora_network_create(model, np, &net) != LORA_OK) {
        fprintf(stderr, "bench_generate: network: %s\n", lora_errmsg(ctx));
        return 1;
    }
    if (lora_model_attach(model, net, 1.0, LORA_APPLY_RUNTIME) != LORA_OK) {
        fprintf(stderr, "bench_generate: attach: %s\n", lora_errmsg(ctx));
        return 1;
    }
    double rt = run(ctx, model, p, NULL);
    int64_t nmod = 0;
    lora_network_get_int(net, LORA_NETWORK_MODULES, &nmod);
    printf("# peak RSS after the runtime-LoRA run (rank 16 on all %lld modules): %.2f GiB\n", (long long)nmod,
           vm_hwm_kb() / 1048576.0);
    printf("gen_lora_runtime_step %.3f\n", rt);
    lora_model_detach(model, net);
    lora_model_attach(model, net, 1.0, LORA_APPLY_MERGE);
    double mg = run(ctx, model, p, NULL);
    printf("gen_lora_merged_step %.3f\n", mg);
    printf("# LoRA runtime / merged seconds per step: %.3f\n", mg > 0 ? rt / mg : 0.0);
    printf("# peak RSS: %.2f GiB\n", vm_hwm_kb() / 1048576.0);
    lora_network_free(net);
    lora_params_free(np);
    lora_params_free(p);
    lora_model_free(model);
    lora_ctx_free(ctx);
    return 0;
}
