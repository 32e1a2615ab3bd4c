/* CLIP text encoder as transformers 4.25.1 CLIPTextModel computes it, for SD v1 (CLIP ViT-L/14:
 * quick_gelu) and SD v2 (OpenCLIP ViT-H/14 in the HF layout kohya/diffusers convert it to:
 * gelu, 23 of 24 blocks): token + position embedding, pre-LN blocks (LN -> causal multi-head
 * self-attention -> residual; LN -> fc1 -> activation -> fc2 -> residual), final LayerNorm,
 * pooled output at the argmax-id (EOS) position. No padding mask (kohya passes none).
 *
 * Forward and backward are explicit (lib/nn ops); gradients flow to LoRA adapters on
 * self_attn.{q,k,v,out}_proj and mlp.{fc1,fc2} of every layer; the base weights are frozen.
 *
 * Use:
 *   clip_init(&m, be, &sd->te, &sd->cfg)          weights -> fp32, one backend buffer
 *   clip_plan_init(&p, &m, batch, tokens, rank, 1)  activations for one (batch, tokens), once
 *   clip_forward(&p, ids, lora, clip_skip)          p.out, p.pooled, p.hidden[k]
 *   clip_backward(&p, dout, lora)                   LoRA gradients (+=), p.d_embed
 *   clip_download_output(&p, out, pooled)           p.out / p.pooled into host memory
 * Backend buffers: weights, activations (p.hidden, p.out, p.pooled, p.d_embed, ...), the
 * adapters' down/up/d_down/d_up and clip_backward's dout are buffers of the model's backend:
 * host memory on the CPU backend (read them directly), device memory on the CUDA backend
 * (read them with clip_download_output or be->iface->download; work is queued on the
 * backend's stream and the download waits for it). Token ids are host arrays on every
 * backend. Every op goes through the backend vtable (lib/nn), so the CPU and CUDA backends
 * run the same graph. A plan is used by one thread at a time. */
#ifndef LORA_MODEL_CLIP_H
#define LORA_MODEL_CLIP_H

#include "model/sd_model.h"
#include "nn/nn.h"

/* LoRA slots of one encoder layer, in the order of the adapter array. */
enum clip_slot { CLIP_Q, CLIP_K, CLIP_V, CLIP_OUT, CLIP_FC1, CLIP_FC2, CLIP_N_SLOTS };

/* Module path of a slot inside text_model.encoder.layers.N ("self_attn.q_proj", ...,
 * "mlp.fc2"); NULL for an unknown slot. */
const char *clip_slot_name(int slot);

struct clip_layer {
    const float *ln1_g, *ln1_b;
    const float *w[CLIP_N_SLOTS];   /* [out, in] per slot */
    const float *b[CLIP_N_SLOTS];   /* [out] */
    const float *ln2_g, *ln2_b;
};

struct clip_model {
    struct lora_backend_impl *be;
    int64_t layers, hidden, heads, inter, positions, vocab;
    int gelu;                       /* 1: exact gelu (v2); 0: quick_gelu (v1) */
    float eps;                      /* LayerNorm eps, 1e-5 */
    float *weights;                 /* the one backend buffer everything below points into */
    const float *tok_emb;           /* [vocab, hidden] */
    const float *pos_emb;           /* [positions, hidden] */
    const float *fln_g, *fln_b;     /* final_layer_norm */
    struct clip_layer *layer;       /* [layers] */
};

/* Reads the text encoder from `te` (transformers names "text_model....", F32/F16/BF16) with
 * the architecture in `cfg` (te_layers, te_hidden, te_heads, te_intermediate,
 * te_max_positions, te_vocab, te_gelu). Every tensor of cfg->te_layers layers must be present
 * with its exact shape; errors name the tensor. On failure *m is left empty (clip_free ok). */
lora_status clip_init(struct clip_model *m, struct lora_backend_impl *be,
                      const struct tensor_map *te, const struct sd_config *cfg);
/* CLIP's tokenizer emits ids below 49408; a test-size encoder (the tiny fixtures, 256 tokens)
 * has fewer rows. Folds ids into m->vocab (id % vocab) so such models can be trained and
 * prompted alike; returns 1 when it folded (callers warn once), 0 for a full-size encoder. */
int clip_fold_ids(const struct clip_model *m, int32_t *ids, int64_t n);
void clip_free(struct clip_model *m);

/* Saved activations of one layer. */
struct clip_act {
    float *ln1, *ln1_mean, *ln1_rstd;
    float *qkv[3];                  /* q, k, v [n, hidden] */
    float *probs;                   /* [batch, heads, tokens, tokens] */
    float *att;                     /* attention output before out_proj [n, hidden] */
    float *x2;                      /* residual stream after the attention block */
    float *ln2, *ln2_mean, *ln2_rstd;
    float *f, *g;                   /* fc1 output, activation output [n, inter] */
    float *lora_h[CLIP_N_SLOTS];    /* down(x) per adapter [n, max_rank] */
};

struct clip_plan {
    const struct clip_model *m;
    int64_t batch, tokens, n;       /* n = batch * tokens rows */
    int64_t max_rank;               /* largest adapter rank the plan takes */
    int train;                      /* 1: per-layer activations kept and backward buffers */
    int64_t layers_run;             /* set by clip_forward: layers evaluated */
    void *mem;                      /* the one backend buffer of everything below but act, ids_host */
    void *host_mem;                 /* host memory of act and ids_host */
    int32_t *ids;                   /* [n] backend copy of the last forward's ids */
    int32_t *ids_host;              /* [n] host copy (the pooled position is found on the host) */
    float *hidden;                  /* hidden_states[k] = hidden + k*n*hidden, k = 0..layers */
    float *out;                     /* [n, hidden] final_layer_norm(hidden_states[-clip_skip]) */
    float *out_mean, *out_rstd;
    float *pooled;                  /* [batch, hidden] out at the argmax-id position */
    float *tmp;                     /* [n, hidden] */
    struct clip_act *act;           /* [layers] (train) or [1] (inference, reused) */
    /* backward */
    float *d_embed;                 /* [n, hidden]: d hidden_states[0] after clip_backward */
    float *dln, *da, *dqkv[3];      /* [n, hidden] */
    float *dg;                      /* [n, inter] */
    float *dscratch;                /* [heads, tokens, tokens] */
    int64_t dscratch_floats;
    float *dh;                      /* [n, max_rank] */
};

/* Plans activations for `batch` sequences of `tokens` (<= positions) ids; adapters up to
 * rank `max_rank` (0: none). train = 0 keeps one layer's activations (forward only). */
lora_status clip_plan_init(struct clip_plan *p, const struct clip_model *m, int64_t batch,
                           int64_t tokens, int64_t max_rank, int train);
void clip_plan_free(struct clip_plan *p);
/* Backend-buffer bytes clip_plan_init would allocate (0 when the sizes overflow); a small
 * host part (the per-layer pointer table and a host copy of the ids) comes on top. */
uint64_t clip_plan_bytes(const struct clip_model *m, int64_t batch, int64_t tokens,
                         int64_t max_rank, int train);

/* ids [batch, tokens] (host memory). lora: NULL or [layers * CLIP_N_SLOTS] adapters indexed
 * layer * CLIP_N_SLOTS + slot (NULL entries: none); each must match its layer's shape and
 * have rank <= max_rank. clip_skip (kohya): 0 or 1 = last layer; n >= 2 runs only the first
 * layers - n + 1 layers and normalises hidden_states[-n]; at most layers + 1.
 * p->pooled is taken from p->out (transformers' pooler_output when clip_skip <= 1). */
lora_status clip_forward(struct clip_plan *p, const int32_t *ids,
                         const struct nn_lora *const *lora, int32_t clip_skip);
/* Backward of the last clip_forward (same lora array) from dout = dL/d p->out [n, hidden]
 * (a backend buffer): adapters' d_down/d_up += ; p->d_embed = dL/d hidden_states[0]. Needs
 * train = 1. A pooled gradient is a dout row at the pooled position. */
lora_status clip_backward(struct clip_plan *p, const float *dout,
                          const struct nn_lora *const *lora);
/* Copies the last forward's p->out [n, hidden] into `out` and p->pooled [batch, hidden] into
 * `pooled` (host memory; either may be NULL), waiting for the backend's queued work. */
lora_status clip_download_output(const struct clip_plan *p, float *out, float *pooled);

/* ---- kohya --max_token_length 150|225 (spec §4.5; train_util get_input_ids and
 * get_hidden_states) ----------------------------------------------------------------------
 * A prompt of `n_chunks * (chunk - 2) + 2` ids (BOS, content, EOS/padding) is encoded as
 * n_chunks sequences of `chunk` (77) ids, chunk k = ids[0], ids[1 + k*(chunk-2) ...
 * (k+1)*(chunk-2)], ids[last]. When pad_id != eos_id (v2): if chunk[-2] is neither EOS nor
 * PAD, chunk[-1] = EOS; if chunk[1] == PAD, chunk[1] = EOS. */
lora_status clip_split_chunks(lora_ctx *ctx, int32_t *chunks, const int32_t *ids, int64_t batch,
                              int64_t n_chunks, int64_t chunk, int32_t eos_id, int32_t pad_id);
/* Host buffers (download an encoder's output first on a device backend).
 * Re-join: enc [batch * n_chunks, chunk, c] (sequence b*n_chunks + k is chunk k of prompt b)
 * -> out [batch, n_chunks*(chunk-2) + 2, c]: position 0 of chunk 0, positions 1..chunk-2 of
 * every chunk, the last position of the last chunk. Inner BOS/EOS states are dropped. Same
 * for v1 and v2 (kohya's v2 fix-up compares against the EOS string and never fires). */
void clip_rejoin_chunks(float *out, const float *enc, int64_t batch, int64_t n_chunks,
                        int64_t chunk, int64_t c);
/* Its backward: d_enc (written, dropped positions get 0) from d_out. */
void clip_rejoin_chunks_backward(float *d_enc, const float *d_out, int64_t batch,
                                 int64_t n_chunks, int64_t chunk, int64_t c);

#endif
