/* Streamed merge of a rank-128 LoRA into an fp16 model (merge_lora.py --sd_model M --models L
 * --ratios 1 --save_precision fp16: float32 arithmetic, fp16 output, so the output has the
 * input's size) against the file I/O of the same bytes measured in the same run: `cat M >
 * /dev/null` (read) and `cp M T` (read + write). The LoRA (every kohya target of the model,
 * conv 3x3 excluded, random factors) is written to the benchmark's temp dir first. The merge
 * runs in a child process so its peak RSS is its own.
 * usage: bench_merge MODEL [TMPDIR] [RANK] [keep]   (scripts/bench.sh merge: MODEL = an SD1.5-size
 * random fp16 model from bench/load_peer.py write; "keep" leaves the LoRA and the merged model in
 * TMPDIR, to compare with another build's output)
 * Prints "name seconds" lines and '#' notes. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench_util.h"
#include "internal.h"
#include "core/rng.h"
#include "network/network.h"

static double run_shell(const char *cmd) {
    double t0 = bench_now();
    int rc = system(cmd);
    double t = bench_now() - t0;
    if (rc != 0) { fprintf(stderr, "bench_merge: '%s' failed (%d)\n", cmd, rc); exit(1); }
    return t;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: bench_merge MODEL [TMPDIR] [RANK]\n");
        return 2;
    }
    const char *model = argv[1], *tmp = argc > 2 ? argv[2] : "/tmp";
    int64_t rank = argc > 3 ? atoll(argv[3]) : 128;
    int keep = argc > 4 && strcmp(argv[4], "keep") == 0;
    char lora[600], out[600], copy[600], cmd[2000];
    snprintf(lora, sizeof lora, "%s/bench_merge_lora.safetensors", tmp);
    snprintf(out, sizeof out, "%s/bench_merge_out.safetensors", tmp);
    snprintf(copy, sizeof copy, "%s/bench_merge_copy.safetensors", tmp);
    lora_ctx *ctx = NULL;
    if (lora_ctx_create(LORA_ABI_VERSION, &ctx) != LORA_OK) return 1;

    /* the LoRA: kohya's module list of the model, random factors (scaled so deltas are small) */
    lora_model *m = NULL;
    lora_params *p = NULL;
    lora_network *net = NULL;
    lora_params_create(ctx, &p);
    lora_params_set_int(p, LORA_P_NETWORK_DIM, rank);
    lora_params_set_float(p, LORA_P_NETWORK_ALPHA, (double)rank);
    if (lora_model_load(ctx, model, NULL, &m) != LORA_OK || lora_network_create(m, p, &net) != LORA_OK) {
        fprintf(stderr, "bench_merge: %s\n", lora_errmsg(ctx));
        return 1;
    }
    int64_t params = 0;
    for (int64_t i = 0; i < net->n; i++) {
        struct net_module *mm = &net->m[i];
        int64_t k = mm->in * mm->kh * mm->kw;
        lora_philox_normal(11 + (uint64_t)i, 0, mm->down, mm->rank * k);
        lora_philox_normal(911 + (uint64_t)i, 0, mm->up, mm->out * mm->rank);
        for (int64_t e = 0; e < mm->out * mm->rank; e++) mm->up[e] *= 1e-4f;
        params += mm->rank * (k + mm->out);
    }
    if (lora_network_save(net, lora, NULL) != LORA_OK) { fprintf(stderr, "bench_merge: %s\n", lora_errmsg(ctx)); return 1; }
    lora_network_free(net);
    lora_model_free(m);
    lora_params_free(p);
    net = NULL;
    if (lora_network_load(ctx, lora, &net) != LORA_OK) { fprintf(stderr, "bench_merge: %s\n", lora_errmsg(ctx)); return 1; }
    struct stat sb;
    stat(model, &sb);
    printf("# model %s: %.2f GB; LoRA rank %lld, %lld modules, %.1f M parameters; merge float32, saved fp16\n", model,
           (double)sb.st_size / 1e9, (long long)rank, (long long)net->n, (double)params / 1e6);

    /* file I/O of the same bytes (page cache warm after the loads above, as for the merge) */
    snprintf(cmd, sizeof cmd, "cat '%s' > /dev/null", model);
    double t_cat = run_shell(cmd);
    snprintf(cmd, sizeof cmd, "cp '%s' '%s' && sync -f '%s'", model, copy, copy);
    double t_cp = run_shell(cmd);
    unlink(copy);

    /* the merge, in a child: its own peak RSS (which starts with the pages it shares with this
     * process at the fork: the loaded LoRA and the libraries) */
    struct rusage self;
    getrusage(RUSAGE_SELF, &self);
    double t0 = bench_now();
    pid_t pid = fork();
    if (pid == 0) {
        lora_params *o = NULL;
        lora_params_create(ctx, &o);
        lora_params_set_string(o, LORA_P_PRECISION, "float");
        lora_params_set_string(o, LORA_P_SAVE_PRECISION, "fp16");
        const double ratio = 1.0;
        lora_status s = lora_merge_file(ctx, model, (const lora_network *const *)&net, &ratio, 1, out, o);
        if (s != LORA_OK) fprintf(stderr, "bench_merge: %s\n", lora_errmsg(ctx));
        _exit(s == LORA_OK ? 0 : 1);
    }
    int status = 0;
    struct rusage ru;
    memset(&ru, 0, sizeof ru);
    if (pid < 0 || wait4(pid, &status, 0, &ru) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) return 1;
    double t_merge = bench_now() - t0;
    struct stat so;
    stat(out, &so);
    if (!keep) {
        unlink(out);
        unlink(lora);
    }
    printf("# merge peak RSS %.0f MB (model %.0f MB: mapped pages count while touched; the parent's peak before "
           "the fork: %.0f MB); output %.2f GB\n", (double)ru.ru_maxrss / 1024.0, (double)sb.st_size / 1e6,
           (double)self.ru_maxrss / 1024.0, (double)so.st_size / 1e9);
    /* CPU time against wall time: above 1 the copier computed alongside the merging thread */
    double cpu = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
    printf("# merge CPU time %.2f s (user %.2f s), %.2f cores busy on average\n", cpu,
           (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6, cpu / t_merge);
    printf("# merge / cp time %.2fx (target <= 1.2x), merge / cat time %.2fx\n", t_merge / t_cp, t_merge / t_cat);
    printf("merge %.3f\n", t_merge);
    printf("cp %.3f\n", t_cp);
    printf("cat %.3f\n", t_cat);
    lora_network_free(net);
    lora_ctx_free(ctx);
    return 0;
}
