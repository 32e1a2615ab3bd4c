/* The resumable training state (our format, not accelerate's): one .safetensors file with
 *   params     F32 [LoRA floats]   every down then up weight, module order
 *   optim      F32 [state floats]  optimizer state as stored (8-bit codes and absmax as raw bytes)
 *   tsteps     I64 [2 modules]     each tensor's optimizer step count
 *   rng        I64 [627]           mt19937 words, index, has_normal, next_normal's bits
 *   loss_list  F64 [batches/epoch] kohya's running-average window
 * and metadata: counters, the loss scaler, the session id, and "config", the run's
 * fingerprint (trainer_fingerprint), which must match on load (LORA_E_RESUME_MISMATCH names
 * the first line that differs). State is saved only between optimizer steps, so no gradient
 * is pending. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/safetensors.h"
#include "train/trainer.h"

#define RNG_WORDS 627

static void pack_rng(const struct lora_mt19937 *g, int64_t *o) {
    for (int i = 0; i < 624; i++) o[i] = g->state[i];
    o[624] = g->index;
    o[625] = g->has_normal;
    memcpy(&o[626], &g->next_normal, 8);
}

static void unpack_rng(struct lora_mt19937 *g, const int64_t *o) {
    for (int i = 0; i < 624; i++) g->state[i] = (uint32_t)o[i];
    g->index = (int32_t)o[624];
    g->has_normal = (int32_t)o[625];
    memcpy(&g->next_normal, &o[626], 8);
}

lora_status trainer_save_state(const struct lora_trainer *tr, const char *path) {
    lora_ctx *ctx = tr->ctx;
    const struct train_state *st = &tr->st;
    const struct lora_network *net = tr->net;
    int64_t nf = st->n_floats, ns = st->n_state, n = net->n, bpe = tr->src.batches_per_epoch;
    float *params = lora_malloc(ctx, (size_t)(nf ? nf : 1) * sizeof(float));
    int64_t rng[RNG_WORDS];
    if (!params) return LORA_E_NOMEM;
    for (int64_t i = 0; i < n; i++) {
        const struct net_module *mm = &net->m[i];
        int64_t nd = mm->nn.rank * mm->nn.in, nu = mm->nn.out * mm->nn.rank;
        memcpy(params + st->off[i], mm->down, (size_t)nd * sizeof(float));
        memcpy(params + st->off[i] + nd, mm->up, (size_t)nu * sizeof(float));
    }
    pack_rng(&tr->rng, rng);
    int64_t sh_p = nf, sh_o = ns, sh_t = 2 * n, sh_r = RNG_WORDS, sh_l = bpe;
    struct st_write_tensor t[5] = {
        {"params", LORA_DTYPE_F32, 1, &sh_p, params},
        {"optim", LORA_DTYPE_F32, 1, &sh_o, st->ostate},
        {"tsteps", LORA_DTYPE_I64, 1, &sh_t, st->tsteps},
        {"rng", LORA_DTYPE_I64, 1, &sh_r, rng},
        {"loss_list", LORA_DTYPE_F64, 1, &sh_l, tr->loss_list},
    };
    char fp[4096];
    trainer_fingerprint(tr, fp, sizeof fp);
    char v[12][48];
    snprintf(v[0], sizeof v[0], "%" PRId64, tr->global_step);
    snprintf(v[1], sizeof v[1], "%" PRId64, tr->sched_steps);
    snprintf(v[2], sizeof v[2], "%" PRId64, tr->epoch);
    snprintf(v[3], sizeof v[3], "%" PRId64, tr->batch_index);
    snprintf(v[4], sizeof v[4], "%" PRId64, tr->loss_n);
    snprintf(v[5], sizeof v[5], "%.17g", tr->loss_total);
    snprintf(v[6], sizeof v[6], "%.9g", (double)tr->scaler.scale);
    snprintf(v[7], sizeof v[7], "%" PRId64, tr->scaler.growth_tracker);
    snprintf(v[8], sizeof v[8], "%" PRId64, tr->scaler.skipped);
    snprintf(v[9], sizeof v[9], "%" PRId64, tr->session_id);
    snprintf(v[10], sizeof v[10], "%.17g", tr->started_at);
    snprintf(v[11], sizeof v[11], "%" PRId64, st->steps);
    const char *keys[] = {"liblora_train_state", "config", "global_step", "sched_steps", "epoch", "batch_index",
                          "loss_n", "loss_total", "loss_scale", "growth_tracker", "skipped_steps", "session_id",
                          "training_started_at", "optimizer_steps"};
    const char *vals[] = {"1", fp, v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11]};
    lora_status s = st_write(ctx, path, t, 5, keys, vals, (int64_t)(sizeof keys / sizeof keys[0]));
    lora_free(ctx, params);
    if (s == LORA_OK) lora_log(ctx, LORA_LOG_INFO, "saved training state %s (step %" PRId64 ")", path, tr->global_step);
    return s;
}

static const char *meta(const struct lora_file *f, const char *key) {
    for (int64_t i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta_keys[i], key) == 0) return f->meta_vals[i];
    return NULL;
}

static int64_t find(const struct lora_file *f, const char *name, lora_dtype dt, int64_t count) {
    for (int64_t i = 0; i < f->n_tensors; i++) {
        const struct st_tensor *t = &f->tensors[i];
        if (strcmp(t->name, name) != 0) continue;
        if (t->dtype != dt || t->ndim != 1 || t->shape[0] != count) return -2;
        return i;
    }
    return -1;
}

static lora_status mismatch(lora_ctx *ctx, const char *path, const char *saved, const char *now) {
    /* the first differing line of the two fingerprints */
    const char *a = saved, *b = now;
    while (*a && *b) {
        const char *ea = strchr(a, '\n'), *eb = strchr(b, '\n');
        size_t la = ea ? (size_t)(ea - a) : strlen(a), lb = eb ? (size_t)(eb - b) : strlen(b);
        if (la != lb || memcmp(a, b, la) != 0)
            return lora_fail(ctx, LORA_E_RESUME_MISMATCH, "resume: %s was saved by a run with %.*s; this run has %.*s",
                             path, (int)la, a, (int)lb, b);
        a += la + (ea ? 1 : 0);
        b += lb + (eb ? 1 : 0);
    }
    return lora_fail(ctx, LORA_E_RESUME_MISMATCH, "resume: %s was saved by a differently configured run", path);
}

static int64_t num(const struct lora_file *f, const char *key, int *ok) {
    const char *v = meta(f, key);
    char *end = NULL;
    long long x = v ? strtoll(v, &end, 10) : 0;
    if (!v || !end || *end) *ok = 0;
    return (int64_t)x;
}

static double dnum(const struct lora_file *f, const char *key, int *ok) {
    const char *v = meta(f, key);
    char *end = NULL;
    double x = v ? strtod(v, &end) : 0;
    if (!v || !end || *end) *ok = 0;
    return x;
}

lora_status trainer_load_state(struct lora_trainer *tr, const char *path) {
    lora_ctx *ctx = tr->ctx;
    struct lora_file *f = NULL;
    LORA_TRY(st_open(ctx, path, &f));
    lora_status s = LORA_OK;
    struct train_state *st = &tr->st;
    struct lora_network *net = tr->net;
    const char *tag = meta(f, "liblora_train_state"), *cfg = meta(f, "config");
    char fp[4096];
    trainer_fingerprint(tr, fp, sizeof fp);
    int64_t ip = -1, io = -1, it = -1, ir = -1, il = -1;
    if (!tag || strcmp(tag, "1") != 0 || !cfg) {
        s = lora_fail(ctx, LORA_E_NOT_A_MODEL, "resume: %s is not a liblora training state", path);
    } else if (strcmp(cfg, fp) != 0) {
        s = mismatch(ctx, path, cfg, fp);
    } else {
        ip = find(f, "params", LORA_DTYPE_F32, st->n_floats);
        io = find(f, "optim", LORA_DTYPE_F32, st->n_state);
        it = find(f, "tsteps", LORA_DTYPE_I64, 2 * net->n);
        ir = find(f, "rng", LORA_DTYPE_I64, RNG_WORDS);
        il = find(f, "loss_list", LORA_DTYPE_F64, tr->src.batches_per_epoch);
        if (ip < 0 || io < 0 || it < 0 || ir < 0 || il < 0)
            s = lora_fail(ctx, LORA_E_RESUME_MISMATCH, "resume: %s: tensor %s is missing or has another size", path,
                          ip < 0 ? "params" : io < 0 ? "optim" : it < 0 ? "tsteps" : ir < 0 ? "rng" : "loss_list");
    }
    int ok = 1;
    int64_t gs = 0, ss = 0, ep = 0, bi = 0, ln = 0, gt = 0, sk = 0, sid = 0, os = 0;
    double lt = 0, scale = 0, sa = 0;
    if (s == LORA_OK) {
        gs = num(f, "global_step", &ok), ss = num(f, "sched_steps", &ok), ep = num(f, "epoch", &ok);
        bi = num(f, "batch_index", &ok), ln = num(f, "loss_n", &ok), gt = num(f, "growth_tracker", &ok);
        sk = num(f, "skipped_steps", &ok), sid = num(f, "session_id", &ok), os = num(f, "optimizer_steps", &ok);
        lt = dnum(f, "loss_total", &ok), scale = dnum(f, "loss_scale", &ok), sa = dnum(f, "training_started_at", &ok);
        if (!ok || gs < 0 || gs > tr->max_train_steps || ep < 0 || bi < 0 || bi > tr->src.batches_per_epoch || ln < 0 ||
            ln > tr->src.batches_per_epoch || !(scale > 0))
            s = lora_fail(ctx, LORA_E_RESUME_MISMATCH, "resume: %s: the counters in its metadata are missing or out of range", path);
    }
    if (s == LORA_OK) {
        const float *params = (const float *)st_data(f, ip);
        for (int64_t i = 0; i < net->n; i++) {
            struct net_module *mm = &net->m[i];
            int64_t nd = mm->nn.rank * mm->nn.in, nu = mm->nn.out * mm->nn.rank;
            memcpy(mm->down, params + st->off[i], (size_t)nd * sizeof(float));
            memcpy(mm->up, params + st->off[i] + nd, (size_t)nu * sizeof(float));
        }
        memcpy(st->ostate, st_data(f, io), (size_t)st->n_state * sizeof(float));
        memcpy(st->tsteps, st_data(f, it), (size_t)(2 * net->n) * sizeof(int64_t));
        int64_t rng[RNG_WORDS];
        memcpy(rng, st_data(f, ir), sizeof rng);
        unpack_rng(&tr->rng, rng);
        memcpy(tr->loss_list, st_data(f, il), (size_t)tr->src.batches_per_epoch * sizeof(double));
        train_zero_grad(st);
        st->steps = os;
        tr->global_step = gs;
        tr->sched_steps = ss;
        tr->epoch = ep;
        tr->batch_index = bi;
        tr->accum = 0;
        tr->loss_n = ln;
        tr->loss_total = lt;
        tr->scaler.scale = (float)scale;
        tr->scaler.growth_tracker = gt;
        tr->scaler.skipped = sk;
        tr->session_id = sid;
        tr->started_at = sa;
        tr->finished = 0;
        lora_log(ctx, LORA_LOG_INFO, "resumed from %s at step %" PRId64 " (epoch %" PRId64 ", batch %" PRId64 ")", path,
                 gs, ep + 1, bi);
    }
    st_close(f);
    return s;
}
