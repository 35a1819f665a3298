/* llamakv shim.
 *
 * llamakv_eval_callback is installed as llama.cpp's cb_eval (ggml-backend scheduler eval callback).
 * First it learns the model's attention layout from one decode in which it only looks (`learn`):
 * at each attention node (FLASH_ATTN_EXT, or the masked SOFT_MAX over k.q) it follows the query
 * operand back to the query's ROPE node, whose input is the pre-RoPE query, and records that
 * node's name and op per layer, with the rope parameters, the logit's scale and soft cap and the
 * attention sinks. Names alone do not identify it: `Qcur-N` names several nodes of a layer and
 * QK-norm models rotate `Qcur_normed-N`. Afterwards it asks for exactly those nodes, read at
 * their own node (ggml may compute ROPE in place over its input), and copies only the rows it
 * needs: a ubatch is described as segments, each a run of one sequence's rows; the last
 * `stats_rows` of a segment are merged into that sequence's running statistics per (layer, head,
 * dimension), the last `window_rows` go to its ring of recent queries. Every
 * asked-for node splits the graph and, on a GPU, costs a synchronisation, so nothing else is
 * asked for: the attention widths are read while the scheduler only asks. Keys and values are
 * not copied here: they are read from the cache state when scoring.
 *
 * The other functions are the kernels Python calls on a sequence state (rows of the K and V
 * cache tensors): conversion to float, expected-attention logits, value norms and the gathers of
 * compaction. They are serial and called per layer from Python threads (cffi releases the GIL);
 * OpenMP spun badly on a loaded machine.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdio.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>
#include <unistd.h>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "ggml.h"
#include "ggml-backend.h"
#include "llamakv_shim.h"

enum {
    ERR_NONE = 0,
    ERR_UBATCH_TOO_LARGE = 2,
    ERR_BAD_SHAPE = 3,
    ERR_BAD_TYPE = 4,
    ERR_LAYER = 5,
    ERR_NO_MEMORY = 6,
    ERR_DEVICE = 7,
    ERR_DEVICE_SHAPE = 8,
};

/* ggml op number of an op name ("ROPE", "RESHAPE", ...), -1 if unknown: lets Python name ops */
int32_t llamakv_op_code(const char * name) {
    for (int i = 0; i < GGML_OP_COUNT; ++i) {
        if (strcmp(ggml_op_name((enum ggml_op) i), name) == 0) return i;
    }
    return -1;
}

const char * llamakv_error_string(int32_t code) {
    switch (code) {
        case ERR_NONE:             return "no error";
        case ERR_UBATCH_TOO_LARGE: return "ubatch larger than the staging buffers";
        case ERR_BAD_SHAPE:        return "captured tensor has an unexpected shape";
        case ERR_BAD_TYPE:         return "tensor type not supported";
        case ERR_LAYER:            return "layer index out of range";
        case ERR_NO_MEMORY:        return "out of memory";
        case ERR_DEVICE:           return "the device could not compute the scores";
        case ERR_DEVICE_SHAPE:     return "the cache tensors do not have the shape the scores need";
        default:                   return "unknown error";
    }
}

static void set_error(llamakv_capture * c, int32_t code) {
    if (c->error == ERR_NONE) c->error = code;
}

static bool is_probe(const llamakv_capture * c, const struct ggml_tensor * t) {
    return c->probe_buf && c->probe_name[0] && t->op == (enum ggml_op) c->probe_op &&
           strcmp(t->name, c->probe_name) == 0;
}

/* "name-12" -> 12: the layer suffix llama.cpp's graph callback gives node names; -1 without one */
static int layer_suffix(const char * name) {
    const char * dash = strrchr(name, '-');
    if (dash == NULL || dash[1] == '\0') return -1;
    int v = 0;
    for (const char * p = dash + 1; *p; ++p) {
        if (*p < '0' || *p > '9') return -1;
        v = v * 10 + (*p - '0');
    }
    return v;
}

enum { NAME_LEN = 64 };

/* layer of a learnt pre-RoPE query node, -1 for any other node */
static int query_layer(const llamakv_capture * c, const struct ggml_tensor * t) {
    if (c->learn || c->q_ops == NULL) return -1;
    int il = layer_suffix(t->name);
    if (il >= 0 && il < c->n_layer) {
        return c->layer_on[il] && c->q_ops[il] == (int32_t) t->op &&
               strcmp(c->q_names + il * NAME_LEN, t->name) == 0 ? il : -1;
    }
    for (il = 0; il < c->n_layer; ++il) {  /* names without a layer suffix */
        if (c->layer_on[il] && c->q_ops[il] == (int32_t) t->op && strcmp(c->q_names + il * NAME_LEN, t->name) == 0) {
            return il;
        }
    }
    return -1;
}

static bool is_attention(const struct ggml_tensor * t) {
    /* the attention's softmax has a mask; a router's softmax (MoE) has none */
    return t->op == GGML_OP_FLASH_ATTN_EXT || (t->op == GGML_OP_SOFT_MAX && t->src[1] != NULL);
}

static float op_param_f32(const struct ggml_tensor * t, int i) {
    float v;
    memcpy(&v, (const char *) t->op_params + i * sizeof(float), sizeof v);
    return v;
}

static bool same_shape3(const struct ggml_tensor * t, int64_t ne0, int64_t ne1, int64_t ne2) {
    return t->ne[0] == ne0 && t->ne[1] == ne1 && t->ne[2] == ne2 && t->ne[3] == 1;
}

/* Layout problems found while learning (Python names them). */
enum {
    LAYOUT_OK = 0,
    LAYOUT_KQ_BIAS = 1,     /* something other than scales and a soft cap between q.k and the softmax */
    LAYOUT_NO_QUERY = 2,    /* the query's walk met no tensor shaped [head_dim, n_head, n_tokens] */
    LAYOUT_LAYER = 3,       /* more attention nodes than layers, or a layer index out of range */
    LAYOUT_AFTER_ROPE = 4,  /* the rotated query goes through another op (a norm) before the attention */
};

/* Does a ROPE node feed t through a few elementwise or normalising ops? (a query normalised after
 * RoPE: the rotation of the captured query would not be what the attention sees) */
static bool rope_below(const struct ggml_tensor * t) {
    for (int depth = 0; t != NULL && depth < 8; ++depth, t = t->src[0]) {
        if (t->op == GGML_OP_ROPE) return true;
        if (t->op != GGML_OP_RMS_NORM && t->op != GGML_OP_NORM && t->op != GGML_OP_L2_NORM && t->op != GGML_OP_MUL &&
            t->op != GGML_OP_ADD && t->op != GGML_OP_RESHAPE && t->op != GGML_OP_VIEW && t->op != GGML_OP_CONT) {
            return false;
        }
    }
    return false;
}

/* The logit of one attention node as softcap, scale (before the q path's own scales), max_bias;
 * returns the kq MUL_MAT's or FLASH_ATTN_EXT's query operand, NULL where the layout is unknown. */
static const struct ggml_tensor * attention_logit(const struct ggml_tensor * a, float * scale, float * softcap,
                                                  float * max_bias, const struct ggml_tensor ** sinks) {
    if (a->op == GGML_OP_FLASH_ATTN_EXT) {
        /* ggml: s = q.k * scale; with a soft cap c: c tanh(s / c) */
        *scale = op_param_f32(a, 0);
        *max_bias = op_param_f32(a, 1);
        *softcap = op_param_f32(a, 2);
        *sinks = a->src[4];
        return a->src[0];
    }
    /* soft_max_ext(x, mask, scale, max_bias) over x = [scale_out] [tanh] [scale_in] (k q) */
    float out = op_param_f32(a, 0), in = 1.0f;
    *max_bias = op_param_f32(a, 1);
    *sinks = a->src[2];
    const struct ggml_tensor * x = a->src[0];
    bool tanh = false;
    for (; x != NULL; x = x->src[0]) {
        if (x->op == GGML_OP_SCALE && op_param_f32(x, 1) == 0.0f) {
            if (tanh) in *= op_param_f32(x, 0); else out *= op_param_f32(x, 0);
        } else if (!tanh && x->op == GGML_OP_UNARY && ggml_get_unary_op(x) == GGML_UNARY_OP_TANH) {
            tanh = true;
        } else {
            break;
        }
    }
    if (x == NULL || x->op != GGML_OP_MUL_MAT) return NULL;
    /* out tanh(in x) = c tanh(scale x / c) with c = out, scale = in out */
    *softcap = tanh ? out : 0.0f;
    *scale = tanh ? in * out : out;
    return x->src[1];
}

/* The scheduler gives a node whose input lives on another backend a copy of it ("CUDA0#name#0",
 * ggml_backend_sched_split_graph), a leaf without sources: the original is a node asked about
 * earlier, found by its name and layout among the last nodes seen. NULL if t is no such copy. */
static const struct ggml_tensor * copied_from(const llamakv_capture * c, const struct ggml_tensor * t) {
    if (t->op != GGML_OP_NONE || c->seen == NULL) return NULL;
    const char * a = strchr(t->name, '#');
    const char * b = strrchr(t->name, '#');
    if (a == NULL || b == a) return NULL;
    const size_t len = (size_t) (b - a - 1);
    for (int32_t i = 1; i <= c->seen_cap; ++i) {
        const struct ggml_tensor * o = c->seen[(c->seen_head - i + 2 * c->seen_cap) % c->seen_cap];
        if (o == NULL) break;
        if (strncmp(o->name, a + 1, len) == 0 && o->name[len] == '\0' && memcmp(o->ne, t->ne, sizeof t->ne) == 0) {
            return o;
        }
    }
    return NULL;
}

static void layout_problem(llamakv_capture * c, int code, const struct ggml_tensor * at) {
    if (c->layout_error) return;
    c->layout_error = code;
    if (at != NULL) {
        snprintf(c->layout_detail, sizeof c->layout_detail, "%s (op %s, %lldx%lldx%lldx%lld)", at->name,
                 ggml_op_name(at->op), (long long) at->ne[0], (long long) at->ne[1], (long long) at->ne[2],
                 (long long) at->ne[3]);
    }
}

static bool is_hadamard(const struct ggml_tensor * t) {
    return t->op == GGML_OP_MUL_MAT && t->src[0] != NULL && strcmp(t->src[0]->name, "attn_inp_k_rot") == 0;
}

/* The persistent cache tensor (`prefix`<il>, [n_embd, kv_size, n_stream], in a buffer, not a
 * node) that an attention operand views, through permutes, copies and casts; NULL where the
 * operand is something else, e.g. the scheduler's copy of a cache on another backend. */
static void * cache_tensor(const struct ggml_tensor * t, const char * prefix) {
    for (int depth = 0; t != NULL && depth < 8; ++depth) {
        const struct ggml_tensor * b = t->view_src;  /* ggml keeps the root of a chain of views */
        if (b != NULL && b->op == GGML_OP_NONE && b->buffer != NULL && strncmp(b->name, prefix, strlen(prefix)) == 0) {
            return (void *) b;
        }
        if (t->op != GGML_OP_VIEW && t->op != GGML_OP_PERMUTE && t->op != GGML_OP_RESHAPE &&
            t->op != GGML_OP_TRANSPOSE && t->op != GGML_OP_CONT && t->op != GGML_OP_CPY) {
            return NULL;
        }
        t = t->src[0];
    }
    return NULL;
}

/* Whether V reaches an attention through a view with a row per dimension (llama.cpp's v_trans,
 * without flash attention): its view's nb[1] (a dimension's stride) exceeds nb[2]. */
static int32_t v_view_transposed(const struct ggml_tensor * t) {
    for (int depth = 0; t != NULL && depth < 8; ++depth, t = t->src[0]) {
        if (t->op == GGML_OP_VIEW && t->view_src != NULL && t->view_src->op == GGML_OP_NONE) {
            return t->nb[1] > t->nb[2];
        }
    }
    return 0;
}

/* Follow an attention node's query back to the pre-RoPE query and record it as layer il's. */
static void learn_attention(llamakv_capture * c, const struct ggml_tensor * a) {
    float scale = 0, softcap = 0, max_bias = 0;
    const struct ggml_tensor * sinks = NULL;
    const struct ggml_tensor * q = attention_logit(a, &scale, &softcap, &max_bias, &sinks);
    if (q == NULL) { layout_problem(c, LAYOUT_KQ_BIAS, a->src[0]); return; }
    const struct ggml_tensor * orig = copied_from(c, q);
    if (orig != NULL) q = orig;
    /* walk: views, permutes, copies, scales and the quantized cache's Hadamard rotation */
    enum { MAX_WALK = 32 };
    const struct ggml_tensor * walked[MAX_WALK];
    float scale_after[MAX_WALK];  /* product of the scales between walked[i] and the attention */
    int n = 0, k_rot = 0;
    float s = 1.0f;
    const struct ggml_tensor * t = q;
    while (t != NULL && n < MAX_WALK) {
        const struct ggml_tensor * orig_t = copied_from(c, t);
        if (orig_t != NULL) t = orig_t;
        walked[n] = t;
        scale_after[n++] = s;
        if (t->op == GGML_OP_SCALE && op_param_f32(t, 1) == 0.0f) {
            s *= op_param_f32(t, 0);
            t = t->src[0];
        } else if (is_hadamard(t)) {
            k_rot = (int) t->src[0]->ne[0];
            t = t->src[1];
        } else if (t->op == GGML_OP_VIEW || t->op == GGML_OP_RESHAPE || t->op == GGML_OP_PERMUTE ||
                   t->op == GGML_OP_CONT || t->op == GGML_OP_TRANSPOSE || t->op == GGML_OP_CPY) {
            t = t->src[0];
        } else {
            break;
        }
    }
    const struct ggml_tensor * rope = NULL, * query = NULL;
    float q_scale = s;
    const int64_t n_tok = q->ne[1] * q->ne[3];  /* permuted: [head_dim, n_tokens, n_head, n_stream] */
    if (t != NULL && t->op == GGML_OP_ROPE) {
        rope = t;
        query = t->src[0];
    } else if (t != NULL && rope_below(t)) {
        layout_problem(c, LAYOUT_AFTER_ROPE, t);
        return;
    } else {
        /* no rope: the deepest tensor of the walk shaped [head_dim, n_head, n_tokens] */
        for (int i = n - 1; i >= 0 && query == NULL; --i) {
            if (walked[i]->op != GGML_OP_PERMUTE && same_shape3(walked[i], q->ne[0], q->ne[2], n_tok)) {
                query = walked[i];
                q_scale = scale_after[i];
            }
        }
    }
    if (query == NULL) { layout_problem(c, LAYOUT_NO_QUERY, t != NULL ? t : walked[n - 1]); return; }
    int il = layer_suffix(query->name);
    if (il < 0 && rope != NULL) il = layer_suffix(rope->name);
    if (il < 0) il = c->n_attn;
    if (il >= c->n_layer || c->n_attn >= c->n_layer) { layout_problem(c, LAYOUT_LAYER, query); return; }
    c->attn_layer[c->n_attn++] = il;
    strncpy(c->q_names + il * NAME_LEN, query->name, NAME_LEN - 1);
    c->q_ops[il] = (int32_t) query->op;
    c->q_shape[il * 2] = (int32_t) query->ne[0];
    c->q_shape[il * 2 + 1] = (int32_t) query->ne[1];
    c->logit[il * 3] = scale * q_scale;
    c->logit[il * 3 + 1] = softcap;
    c->logit[il * 3 + 2] = max_bias;
    c->k_rot[il] = k_rot;
    c->n_kv[il] = (int32_t) (a->op == GGML_OP_FLASH_ATTN_EXT ? a->src[1]->ne[1] : a->src[0]->ne[0]);
    if (c->k_cache != NULL) {
        if (a->op == GGML_OP_FLASH_ATTN_EXT) {
            c->k_cache[il] = cache_tensor(a->src[1], "cache_k_l");
            c->v_cache[il] = cache_tensor(a->src[2], "cache_v_l");
            c->v_trans[il] = v_view_transposed(a->src[2]);
        } else {
            /* soft_max(k q): the kq product's first operand; V comes with the product that reads
             * this softmax (note_graph) */
            const struct ggml_tensor * kq = a->src[0];
            while (kq != NULL && kq->op != GGML_OP_MUL_MAT) kq = kq->src[0];
            c->k_cache[il] = kq != NULL ? cache_tensor(kq->src[0], "cache_k_l") : NULL;
            c->attn_node[il] = (void *) a;
        }
    }
    if (sinks != NULL && sinks->type == GGML_TYPE_F32 && sinks->ne[0] == c->n_head && sinks->buffer) {
        ggml_backend_tensor_get(sinks, c->sinks + (int64_t) il * c->n_head, 0, c->n_head * sizeof(float));
        c->has_sinks[il] = 1;
    }
    if (rope != NULL) {
        strncpy(c->rope_names + il * NAME_LEN, rope->name, NAME_LEN - 1);
        memcpy(c->rope_params + il * 16, rope->op_params, 16 * sizeof(int32_t));
        const struct ggml_tensor * ff = rope->src[2];  /* a model weight: already there */
        if (ff != NULL && ff->type == GGML_TYPE_F32 && ff->ne[0] >= c->head_dim / 2 && ff->buffer) {
            ggml_backend_tensor_get(ff, c->rope_factors + (int64_t) il * (c->head_dim / 2), 0,
                                    (c->head_dim / 2) * sizeof(float));
            c->rope_has_factors[il] = 1;
        }
        c->rope_seen[il] = 1;
    }
}

/* What the scheduler shows while only asking: the layout (learning) and attention widths. */
static void note_graph(llamakv_capture * c, const struct ggml_tensor * t) {
    if (c->learn && c->seen != NULL) {
        c->seen[c->seen_head] = (void *) t;
        c->seen_head = (c->seen_head + 1) % c->seen_cap;
    }
    if (c->learn && c->attn_node != NULL && t->op == GGML_OP_MUL_MAT && t->src[1] != NULL) {
        for (int32_t il = 0; il < c->n_layer; ++il) {  /* kqv = v x softmax(kq) */
            if (c->attn_node[il] == (void *) t->src[1]) {
                c->v_cache[il] = cache_tensor(t->src[0], "cache_v_l");
                c->v_trans[il] = v_view_transposed(t->src[0]);
                c->attn_node[il] = NULL;
            }
        }
    }
    if (!is_attention(t)) return;
    if (c->learn) { learn_attention(c, t); return; }
    if (c->n_attn >= c->n_layer) return;
    const int il = c->attn_layer[c->n_attn++];
    if (il >= 0 && il < c->n_layer) {
        c->n_kv[il] = (int32_t) (t->op == GGML_OP_FLASH_ATTN_EXT ? t->src[1]->ne[1] : t->src[0]->ne[0]);
    }
}

/* Copy tokens [r0, ne[2]) of a F32 tensor [ne0, ne1, ne2] into dst, contiguous. One device read:
 * the span the rows cover (views of fused QKV are gathered on the host from scratch). */
static int read_rows_f32(llamakv_capture * c, const struct ggml_tensor * t, int64_t r0, int64_t n_rows,
                         float * dst, int64_t dst_cap) {
    if (t->type != GGML_TYPE_F32) return ERR_BAD_TYPE;
    if (r0 < 0 || r0 + n_rows > t->ne[2]) return ERR_BAD_SHAPE;
    const int64_t per_row = t->ne[0] * t->ne[1];
    if (n_rows * per_row > dst_cap) return ERR_UBATCH_TOO_LARGE;
    if (n_rows <= 0) return ERR_NONE;
    if (ggml_is_contiguous(t)) {
        ggml_backend_tensor_get(t, dst, r0 * t->nb[2], n_rows * per_row * sizeof(float));
        return ERR_NONE;
    }
    const size_t span = (n_rows - 1) * t->nb[2] + (t->ne[1] - 1) * t->nb[1] + t->ne[0] * t->nb[0];
    const int64_t scratch_cap = (int64_t) c->n_ubatch * 3 * c->n_head * c->head_dim;
    if ((int64_t) (span / sizeof(float)) > scratch_cap) return ERR_UBATCH_TOO_LARGE;
    ggml_backend_tensor_get(t, c->scratch, r0 * t->nb[2], span);
    const char * base = (const char *) c->scratch;
    int64_t k = 0;
    for (int64_t i2 = 0; i2 < n_rows; ++i2)
    for (int64_t i1 = 0; i1 < t->ne[1]; ++i1) {
        const char * row = base + i2 * t->nb[2] + i1 * t->nb[1];
        for (int64_t i0 = 0; i0 < t->ne[0]; ++i0) dst[k++] = *(const float *) (row + i0 * t->nb[0]);
    }
    return ERR_NONE;
}

/* Sums and sums of squares over rows [skip, n_tok) of q [n_tok][hd], for dimensions [j_begin, j_end),
 * in double. A block of dimensions stays in registers / L1 across the rows. */
typedef struct {
    const float * q;
    int64_t hd, skip, n_tok, j_begin, j_end;
    double * sum, * sq;
} sums_job;

static void * column_sums(void * arg) {
    const sums_job * job = (const sums_job *) arg;
    enum { BLOCK = 64 };
    for (int64_t j0 = job->j_begin; j0 < job->j_end; j0 += BLOCK) {
        const int64_t nb = job->j_end - j0 < BLOCK ? job->j_end - j0 : BLOCK;
        double s1[BLOCK] = {0}, s2[BLOCK] = {0};
        for (int64_t t = job->skip; t < job->n_tok; ++t) {
            const float * x = job->q + t * job->hd + j0;
            for (int64_t j = 0; j < nb; ++j) {
                const double v = x[j];
                s1[j] += v;
                s2[j] += v * v;
            }
        }
        memcpy(job->sum + j0, s1, nb * sizeof(double));
        memcpy(job->sq + j0, s2, nb * sizeof(double));
    }
    return NULL;
}

/* Column sums of a whole ubatch take milliseconds per layer, during which a GPU waits for the
 * callback: large ones are split over threads (columns are independent). The threads are started
 * once and wait on a condition variable between merges: creating 7 threads per merge cost about
 * as much as the merge itself (a 32k prompt's sample is 128 merges on an 8B model). */
enum { MAX_SUM_THREADS = 8, MIN_SUM_WORK = 1 << 17 };

static struct {
    pthread_once_t once;
    pthread_mutex_t busy;   /* one merge at a time uses the pool; another caller sums alone */
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    int n_workers;          /* started threads, each taking jobs[1 + its index] */
    int n_jobs, pending;
    int64_t generation;
    sums_job jobs[MAX_SUM_THREADS];
} sum_pool = {PTHREAD_ONCE_INIT, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
              PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, {{0}}};

static void * sum_worker(void * arg) {
    const int index = (int) (intptr_t) arg;
    int64_t seen = 0;
    for (;;) {
        pthread_mutex_lock(&sum_pool.mu);
        while (sum_pool.generation == seen) pthread_cond_wait(&sum_pool.work, &sum_pool.mu);
        seen = sum_pool.generation;
        const bool mine = 1 + index < sum_pool.n_jobs;
        pthread_mutex_unlock(&sum_pool.mu);
        if (mine) column_sums(&sum_pool.jobs[1 + index]);
        pthread_mutex_lock(&sum_pool.mu);
        if (--sum_pool.pending == 0) pthread_cond_signal(&sum_pool.done);
        pthread_mutex_unlock(&sum_pool.mu);
    }
    return NULL;
}

static void start_sum_pool(void) {
    const long n_cpu = sysconf(_SC_NPROCESSORS_ONLN);
    const int n = (int) ((n_cpu < MAX_SUM_THREADS ? n_cpu : MAX_SUM_THREADS) - 1);
    for (int i = 0; i < n; ++i) {
        pthread_t tid;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const bool ok = pthread_create(&tid, &attr, sum_worker, (void *) (intptr_t) i) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        sum_pool.n_workers = i + 1;
    }
}

static void column_sums_parallel(const float * q, int64_t hd, int64_t skip, int64_t n_tok, double * sum, double * sq) {
    pthread_once(&sum_pool.once, start_sum_pool);
    int64_t n_threads = (n_tok - skip) * hd / MIN_SUM_WORK;
    n_threads = n_threads < 1 + sum_pool.n_workers ? n_threads : 1 + sum_pool.n_workers;
    n_threads = n_threads < hd / 64 ? n_threads : hd / 64;
    if (n_threads <= 1 || pthread_mutex_trylock(&sum_pool.busy) != 0) {
        sums_job all = {q, hd, skip, n_tok, 0, hd, sum, sq};
        column_sums(&all);
        return;
    }
    const int64_t per = (hd / 64 + n_threads - 1) / n_threads * 64;  /* whole blocks per thread */
    pthread_mutex_lock(&sum_pool.mu);
    for (int64_t i = 0; i < n_threads; ++i) {
        const int64_t b = i * per, e = b + per < hd ? b + per : hd;
        sum_pool.jobs[i] = (sums_job) {q, hd, skip, n_tok, b < hd ? b : hd, e, sum, sq};
    }
    sum_pool.n_jobs = (int) n_threads;
    sum_pool.pending = sum_pool.n_workers;
    sum_pool.generation++;
    pthread_cond_broadcast(&sum_pool.work);
    pthread_mutex_unlock(&sum_pool.mu);
    column_sums(&sum_pool.jobs[0]);
    pthread_mutex_lock(&sum_pool.mu);
    while (sum_pool.pending > 0) pthread_cond_wait(&sum_pool.done, &sum_pool.mu);
    pthread_mutex_unlock(&sum_pool.mu);
    pthread_mutex_unlock(&sum_pool.busy);
}

/* Merge queries q [n_tok][H][d] at positions pos0.. (those >= n_sink) into layer il's statistics:
 * Chan's parallel form of Welford's update. With n_a rows so far and a batch of n_b rows of mean
 * m_b and M2_b (sum of squared deviations): delta = m_b - mean, mean += delta n_b / n,
 * M2 += M2_b + delta^2 n_a n_b / n (and the same with outer products for the comoment). The
 * batch's mean and M2 come from sums and sums of squares in double, one pass over the rows. */
static void merge_queries(llamakv_capture * c, llamakv_seq_capture * sc, int il, const float * q, int64_t n_tok,
                          int64_t pos0) {
    const int64_t H = c->n_head, d = c->head_dim, hd = H * d;
    const int64_t skip = pos0 >= c->n_sink ? 0 : (c->n_sink - pos0 < n_tok ? c->n_sink - pos0 : n_tok);
    const int64_t n_b = n_tok - skip;
    if (n_b <= 0) return;
    double * sum = c->q_work, * sq = c->q_work + hd;
    column_sums_parallel(q, hd, skip, n_tok, sum, sq);
    double * count = sc->q_count + il;
    const double n_a = *count, n = n_a + (double) n_b, w = n_a * (double) n_b / n;
    double * mean = sc->q_mean + il * hd, * m2 = sc->q_m2 + il * hd, * delta = c->q_work + 2 * hd;
    for (int64_t j = 0; j < hd; ++j) {
        const double mb = sum[j] / (double) n_b;
        const double m2b = sq[j] - sum[j] * mb;
        delta[j] = mb - mean[j];
        m2[j] += (m2b > 0.0 ? m2b : 0.0) + delta[j] * delta[j] * w;
        mean[j] += delta[j] * (double) n_b / n;
    }
    if (sc->q_cov) {
        /* comoment per head (d x d): deviations from the batch mean, then Chan's correction */
        for (int64_t h = 0; h < H; ++h) {
            double * cov = sc->q_cov + (il * H + h) * d * d;
            const double * sh = sum + h * d, * dh = delta + h * d;
            for (int64_t t = skip; t < n_tok; ++t) {
                const float * x = q + t * hd + h * d;
                for (int64_t i = 0; i < d; ++i) {
                    const double di = x[i] - sh[i] / (double) n_b;
                    for (int64_t j = 0; j < d; ++j) cov[i * d + j] += di * (x[j] - sh[j] / (double) n_b);
                }
            }
            for (int64_t i = 0; i < d; ++i)
                for (int64_t j = 0; j < d; ++j) cov[i * d + j] += dh[i] * dh[j] * w;
        }
    }
    *count = n;
}

static int32_t stats_rows_of(const llamakv_capture * c, const llamakv_segment * g) {
    if (!c->stats_enabled) return 0;
    return g->stats_rows < g->n_tok ? g->stats_rows : g->n_tok;
}

static int32_t window_rows_of(const llamakv_segment * g) {
    int32_t r = g->window_rows < g->n_tok ? g->window_rows : g->n_tok;
    return r < g->seq->window_cap ? r : g->seq->window_cap;
}

static bool wants_queries(const llamakv_capture * c) {
    for (int32_t k = 0; k < c->n_seg; ++k)
        if (stats_rows_of(c, &c->segs[k]) > 0 || window_rows_of(&c->segs[k]) > 0) return true;
    return false;
}

/* The rows each segment wants, read from the node (one copy per segment from a device) and
 * merged into that segment's sequence. */
static void observe_query(llamakv_capture * c, const struct ggml_tensor * t, int il) {
    const int64_t per_tok = (int64_t) c->n_head * c->head_dim;
    if (t->ne[0] != c->head_dim || t->ne[1] != c->n_head || t->ne[2] != c->ubatch_n_tok) {
        set_error(c, ERR_BAD_SHAPE);
        return;
    }
    for (int32_t k = 0; k < c->n_seg; ++k) {
        const llamakv_segment * g = &c->segs[k];
        llamakv_seq_capture * sc = g->seq;
        const int64_t rs = stats_rows_of(c, g), rw = window_rows_of(g);
        const int64_t r = rs > rw ? rs : rw;
        if (r <= 0) continue;
        if (g->row0 < 0 || g->row0 + g->n_tok > c->ubatch_n_tok) { set_error(c, ERR_BAD_SHAPE); return; }
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        int err = read_rows_f32(c, t, g->row0 + g->n_tok - r, r, c->q_stage, (int64_t) c->n_ubatch * per_tok);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        c->copy_ns += (int64_t) (t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec);
        if (err) { set_error(c, err); return; }
        if (rs > 0) merge_queries(c, sc, il, c->q_stage + (r - rs) * per_tok, rs, g->pos0 + g->n_tok - rs);
        for (int64_t i = 0; i < rw; ++i) {
            const int64_t slot = (sc->window_head + i) % sc->window_cap;
            memcpy(sc->window + ((int64_t) il * sc->window_cap + slot) * per_tok,
                   c->q_stage + (r - rw + i) * per_tok, per_tok * sizeof(float));
        }
        struct timespec t2;
        clock_gettime(CLOCK_MONOTONIC, &t2);
        sc->capture_ns += (int64_t) (t2.tv_sec - t0.tv_sec) * 1000000000 + (t2.tv_nsec - t0.tv_nsec);
    }
}

static void observe_probe(llamakv_capture * c, const struct ggml_tensor * t) {
    /* the whole tensor, flattened: dims above 2 folded into ne[2] for the row reader */
    struct ggml_tensor view = *t;
    view.ne[2] = t->ne[2] * t->ne[3];
    view.ne[3] = 1;
    if (t->ne[3] > 1 && !ggml_is_contiguous(t)) { set_error(c, ERR_BAD_SHAPE); return; }
    int err = read_rows_f32(c, &view, 0, view.ne[2], c->probe_buf, c->probe_cap);
    if (err) { set_error(c, err); return; }
    c->probe_n = ggml_nelements(t);
    for (int i = 0; i < 4; ++i) c->probe_ne[i] = t->ne[i];
}

bool llamakv_eval_callback(void * tensor, bool ask, void * user_data) {
    struct ggml_tensor * t = (struct ggml_tensor *) tensor;
    llamakv_capture * c = (llamakv_capture *) user_data;
    if (c == NULL || !c->enabled) return ask ? false : true;
    const int il = query_layer(c, t);
    const bool probe = is_probe(c, t);
    if (ask) {
        if (il < 0) note_graph(c, t);
        if (c->learn) return false;
        const bool want_q = il >= 0 && wants_queries(c);
        return want_q || probe;
    }
    if (probe) observe_probe(c, t);
    if (il < 0) return true;
    if (il >= c->n_layer) { set_error(c, ERR_LAYER); return true; }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    observe_query(c, t, il);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    c->capture_ns += (int64_t) (t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec);
    c->n_observed++;
    return true; /* false would only abandon the rest of the split */
}

/* ---- kernels on the cache state ------------------------------------------------------------- */

static ggml_to_float_t to_float_of(int32_t type) {
    if (type < 0 || type >= GGML_TYPE_COUNT) return NULL;
    if (type == GGML_TYPE_F32) return NULL;
    return ggml_get_type_traits((enum ggml_type) type)->to_float;
}

/* row -> float: F32 copied, F16 with the CPU's conversion instructions where there are (ggml-base's
 * own conversion is scalar, and was most of the scoring time), other types through ggml's own
 * dequantisation */
static int row_to_float(const uint8_t * row, int32_t type, int64_t n, float * out) {
    if (type == GGML_TYPE_F32) { memcpy(out, row, n * sizeof(float)); return 0; }
#if defined(__F16C__)
    if (type == GGML_TYPE_F16) {
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) {
            _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (row + 2 * j))));
        }
        if (j < n) ggml_fp16_to_fp32_row((const ggml_fp16_t *) (row + 2 * j), out + j, n - j);
        return 0;
    }
#endif
    ggml_to_float_t f = to_float_of(type);
    if (f == NULL) return ERR_BAD_TYPE;
    f(row, out, n);
    return 0;
}

static int check_type(int32_t type) {
    return (type == GGML_TYPE_F32 || to_float_of(type) != NULL) ? 0 : ERR_BAD_TYPE;
}

int32_t llamakv_rows_to_float(const uint8_t * rows, int32_t type, int64_t row_bytes, int64_t n_rows,
                              int64_t n_per_row, float * out) {
    if (check_type(type)) return ERR_BAD_TYPE;
    for (int64_t i = 0; i < n_rows; ++i) row_to_float(rows + i * row_bytes, type, n_per_row, out + i * n_per_row);
    return 0;
}

/* 8-wide vectors (GCC/Clang vector extension: AVX, SSE or NEON, whatever -march gives) */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

typedef float v4f __attribute__((vector_size(16)));
static inline float hsum(v8f a) {  /* halving, not lane by lane */
    v4f l4, h4;
    memcpy(&l4, &a, sizeof l4);
    memcpy(&h4, (const char *) &a + sizeof l4, sizeof h4);
    const v4f s4 = l4 + h4;
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

static inline v8f load8(const float * p) { v8f x; memcpy(&x, p, sizeof x); return x; }

#if defined(__AVX512F__)
typedef float vwf __attribute__((vector_size(64)));  /* the widest vectors there are */
#else
typedef v8f vwf;
#endif
enum { VW = sizeof(vwf) / sizeof(float) };
static inline vwf loadw(const float * p) { vwf x; memcpy(&x, p, sizeof x); return x; }

static inline float hsumw(vwf a) {
#if defined(__AVX512F__)
    v8f lo, hi;
    memcpy(&lo, &a, sizeof lo);
    memcpy(&hi, (const char *) &a + sizeof lo, sizeof hi);
    return hsum(lo + hi);
#else
    return hsum(a);
#endif
}

static inline float dot_f32(const float * a, const float * b, int32_t n) {
    v8f acc = {0};
    int32_t j = 0;
    for (; j + 8 <= n; j += 8) acc += load8(a + j) * load8(b + j);
    float s = hsum(acc);
    for (; j < n; ++j) s += a[j] * b[j];
    return s;
}

/* out[h][c] = f[c] . m[h] for 4 feature rows f (one per cell, stride fs) and n_rows weight rows m
 * (stride ms): blocks of 4 x 4 accumulators, so each load of a feature or weight vector feeds 4
 * FMAs (one row at a time was load-bound). n is a multiple of 8. */
static inline void dot_block(const float * f, int64_t fs, const float * m, int64_t ms, int32_t n_rows, int32_t n,
                             float * out) {
    const float * f0 = f, * f1 = f + fs, * f2 = f + 2 * fs, * f3 = f + 3 * fs;
    int32_t r = 0;
    for (; r + 4 <= n_rows; r += 4) {
        const float * m0 = m + r * ms, * m1 = m0 + ms, * m2 = m1 + ms, * m3 = m2 + ms;
        v8f a[4][4] = {{{0}}};
        for (int32_t j = 0; j < n; j += 8) {
            const v8f x0 = load8(f0 + j), x1 = load8(f1 + j), x2 = load8(f2 + j), x3 = load8(f3 + j);
            v8f y = load8(m0 + j);
            a[0][0] += x0 * y; a[0][1] += x1 * y; a[0][2] += x2 * y; a[0][3] += x3 * y;
            y = load8(m1 + j);
            a[1][0] += x0 * y; a[1][1] += x1 * y; a[1][2] += x2 * y; a[1][3] += x3 * y;
            y = load8(m2 + j);
            a[2][0] += x0 * y; a[2][1] += x1 * y; a[2][2] += x2 * y; a[2][3] += x3 * y;
            y = load8(m3 + j);
            a[3][0] += x0 * y; a[3][1] += x1 * y; a[3][2] += x2 * y; a[3][3] += x3 * y;
        }
        for (int h = 0; h < 4; ++h)
            for (int c = 0; c < 4; ++c) out[(r + h) * 4 + c] = hsum(a[h][c]);
    }
    for (; r < n_rows; ++r) {
        const float * m0 = m + r * ms;
        v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int32_t j = 0; j < n; j += 8) {
            const v8f y = load8(m0 + j);
            a0 += load8(f0 + j) * y; a1 += load8(f1 + j) * y; a2 += load8(f2 + j) * y; a3 += load8(f3 + j) * y;
        }
        out[r * 4] = hsum(a0); out[r * 4 + 1] = hsum(a1); out[r * 4 + 2] = hsum(a2); out[r * 4 + 3] = hsum(a3);
    }
}

/* The features of one key head src [d] in f: [k (pair-major) | k^2 | pair products]. */
static inline void key_features(const float * src, const int32_t * perm, int32_t d, int32_t P, int kind, float * f) {
    if (kind == 0) {
        memcpy(f, src, d * sizeof(float));
    } else if (kind == 1) {  /* NORM pairs (2p, 2p + 1) */
        for (int32_t p = 0; p < P; ++p) { f[p] = src[2 * p]; f[P + p] = src[2 * p + 1]; }
    } else {
        for (int32_t j = 0; j < d; ++j) f[j] = src[perm[j]];
    }
    for (int32_t j = 0; j < d; ++j) f[d + j] = f[j] * f[j];
    for (int32_t p = 0; p < P; ++p) f[2 * d + p] = f[p] * f[P + p];
}

#if defined(__AVX512F__)
typedef int32_t vwi __attribute__((vector_size(64)));
#define W_EVENS (vwi) {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}
#define W_ODDS (vwi) {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}
#define CL_EVENS 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define CL_ODDS 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
#else
typedef v8i vwi;
#define W_EVENS (vwi) {0, 2, 4, 6, 8, 10, 12, 14}
#define W_ODDS (vwi) {1, 3, 5, 7, 9, 11, 13, 15}
#define CL_EVENS 0, 2, 4, 6, 8, 10, 12, 14
#define CL_ODDS 1, 3, 5, 7, 9, 11, 13, 15
#endif
#if defined(__clang__)
#define EVENSW(l, h) __builtin_shufflevector(l, h, CL_EVENS)
#define ODDSW(l, h) __builtin_shufflevector(l, h, CL_ODDS)
#else
#define EVENSW(l, h) __builtin_shuffle(l, h, W_EVENS)
#define ODDSW(l, h) __builtin_shuffle(l, h, W_ODDS)
#endif

/* One vector of VW rotated pairs (k_a, k_b) of a key head starting at pair p: the pairs are
 * (2p, 2p + 1) (NORM) or (p, P + p) (NEOX). */
static inline void load_pairs(const float * k, int32_t p, int32_t P, bool norm, vwf * a, vwf * b) {
    if (norm) {
        const vwf l = loadw(k + 2 * p), u = loadw(k + 2 * p + VW);
        *a = EVENSW(l, u);
        *b = ODDSW(l, u);
    } else {
        *a = loadw(k + p);
        *b = loadw(k + P + p);
    }
}

/* The logits when every dimension is rotated (2 P = d) in NORM or NEOX pairs and P is a multiple of
 * the vector width: the features of VW pairs (k_a, k_b, k_a², k_b², k_a k_b) live in registers, 2
 * cells x 4 heads at a time, instead of being written out first (29 -> 21 ms per layer of the 8B
 * shape on one thread of the H200 machine's Xeon with 8 lanes). Any group size: the rows past the
 * group's end repeat its first and are not stored. */
static void ea_logits_fused(const uint8_t * rows, int32_t type, int64_t row_bytes, int64_t n_cells, int32_t n_head,
                            int32_t n_head_kv, int32_t d, const float * m, int32_t F, bool norm, const float * anchor,
                            float * keydiff, float * k, float * z) {
    const int64_t per_row = (int64_t) n_head_kv * d;
    const int32_t group = n_head / n_head_kv, P = d / 2;
    for (int64_t i0 = 0; i0 < n_cells; i0 += 2) {
        const int64_t i1 = i0 + 1 < n_cells ? i0 + 1 : i0;  /* an odd last cell is scored twice */
        row_to_float(rows + i0 * row_bytes, type, per_row, k);
        row_to_float(rows + i1 * row_bytes, type, per_row, k + per_row);
        for (int32_t g = 0; g < n_head_kv; ++g) {
            const float * k0 = k + (int64_t) g * d, * k1 = k0 + per_row;
            if (keydiff != NULL) {  /* minus the cosine to the anchor, while the key is at hand */
                const float * u = anchor + (int64_t) g * d;
                vwf n0 = {0}, n1 = {0}, c0 = {0}, c1 = {0};
                for (int32_t p = 0; p < P; p += VW) {
                    vwf a0, b0, a1, b1;
                    load_pairs(k0, p, P, norm, &a0, &b0);
                    load_pairs(k1, p, P, norm, &a1, &b1);
                    const vwf ua = loadw(u + p), ub = loadw(u + P + p);
                    n0 += a0 * a0 + b0 * b0; n1 += a1 * a1 + b1 * b1;
                    c0 += a0 * ua + b0 * ub; c1 += a1 * ua + b1 * ub;
                }
                keydiff[(int64_t) g * n_cells + i0] = -hsumw(c0) / fmaxf(sqrtf(hsumw(n0)), 1e-6f);
                keydiff[(int64_t) g * n_cells + i1] = -hsumw(c1) / fmaxf(sqrtf(hsumw(n1)), 1e-6f);
            }
            for (int32_t h0 = g * group; h0 < (g + 1) * group; h0 += 4) {
                const int32_t nh = (g + 1) * group - h0 < 4 ? (g + 1) * group - h0 : 4;
                const float * w0 = m + (int64_t) h0 * F;
                const float * wr[4] = {w0, nh > 1 ? w0 + F : w0, nh > 2 ? w0 + 2 * F : w0, nh > 3 ? w0 + 3 * F : w0};
                vwf acc[4][2] = {{{0}}};
                for (int32_t p = 0; p < P; p += VW) {
                    vwf a0, b0, a1, b1;
                    load_pairs(k0, p, P, norm, &a0, &b0);
                    load_pairs(k1, p, P, norm, &a1, &b1);
                    const vwf aa0 = a0 * a0, bb0 = b0 * b0, ab0 = a0 * b0, aa1 = a1 * a1, bb1 = b1 * b1, ab1 = a1 * b1;
                    for (int h = 0; h < 4; ++h) {
                        const float * w = wr[h] + p;
                        const vwf wa = loadw(w), wb = loadw(w + P), da = loadw(w + d), db = loadw(w + d + P);
                        const vwf c = loadw(w + 2 * d);
                        acc[h][0] += a0 * wa + b0 * wb + aa0 * da + bb0 * db + ab0 * c;
                        acc[h][1] += a1 * wa + b1 * wb + aa1 * da + bb1 * db + ab1 * c;
                    }
                }
                for (int h = 0; h < nh; ++h) {
                    z[(int64_t) (h0 + h) * n_cells + i0] = hsumw(acc[h][0]);
                    z[(int64_t) (h0 + h) * n_cells + i1] = hsumw(acc[h][1]);
                }
            }
        }
    }
}

int32_t llamakv_ea_logits(const uint8_t * rows, int32_t type, int64_t row_bytes, int64_t n_cells,
                          int32_t n_head, int32_t n_head_kv, int32_t head_dim,
                          const float * m, const int32_t * perm, int32_t n_pairs, const float * anchor,
                          float * keydiff, float * z) {
    if (check_type(type)) return ERR_BAD_TYPE;
    enum { CB = 4 };  /* cells per block */
    const int64_t per_row = (int64_t) n_head_kv * head_dim;
    const int32_t group = n_head / n_head_kv, d = head_dim, P = n_pairs;
    const int32_t F = 2 * head_dim + n_pairs, Fp = (F + 7) / 8 * 8;  /* features padded with zeros to 8 */
    bool identity = true, adjacent = 2 * P == d;
    for (int32_t j = 0; j < d; ++j) identity = identity && perm[j] == j;
    for (int32_t p = 0; p < P && adjacent; ++p) adjacent = perm[p] == 2 * p && perm[P + p] == 2 * p + 1;
    if (2 * P == d && P % VW == 0 && (identity || adjacent)) {
        float * k = malloc(2 * per_row * sizeof(float));
        if (k == NULL) return ERR_NO_MEMORY;
        ea_logits_fused(rows, type, row_bytes, n_cells, n_head, n_head_kv, d, m, F, adjacent, anchor, keydiff, k, z);
        free(k);
        return 0;
    }
    float * k = malloc((CB * per_row + CB * Fp + CB * group) * sizeof(float));
    float * mp = calloc((size_t) n_head * Fp, sizeof(float));
    if (k == NULL || mp == NULL) { free(k); free(mp); return ERR_NO_MEMORY; }
    for (int32_t h = 0; h < n_head; ++h) memcpy(mp + (int64_t) h * Fp, m + (int64_t) h * F, F * sizeof(float));
    float * f = k + CB * per_row;  /* features of the block's keys, one row of Fp per cell */
    float * zb = f + CB * Fp;      /* [group][CB] */
    for (int c = 0; c < CB; ++c)
        for (int32_t j = F; j < Fp; ++j) f[c * Fp + j] = 0.0f;
    const int kind = identity ? 0 : adjacent ? 1 : 2;
    for (int64_t i0 = 0; i0 < n_cells; i0 += CB) {
        const int nc = n_cells - i0 < CB ? (int) (n_cells - i0) : CB;
        for (int c = 0; c < nc; ++c) row_to_float(rows + (i0 + c) * row_bytes, type, per_row, k + c * per_row);
        for (int c = nc; c < CB; ++c) memcpy(k + c * per_row, k, per_row * sizeof(float));  /* unused */
        for (int32_t g = 0; g < n_head_kv; ++g) {
            for (int c = 0; c < CB; ++c) key_features(k + c * per_row + (int64_t) g * d, perm, d, P, kind, f + c * Fp);
            for (int c = 0; c < nc && keydiff != NULL; ++c) {  /* features: [k (permuted) | k*k | ...] */
                float sq = 0.0f;
                for (int32_t j = 0; j < d; ++j) sq += f[c * Fp + d + j];
                keydiff[(int64_t) g * n_cells + i0 + c] =
                    -dot_f32(f + c * Fp, anchor + (int64_t) g * d, d) / fmaxf(sqrtf(sq), 1e-6f);
            }
            dot_block(f, Fp, mp + (int64_t) g * group * Fp, Fp, group, Fp, zb);
            for (int32_t h = 0; h < group; ++h)
                for (int c = 0; c < nc; ++c) z[(int64_t) (g * group + h) * n_cells + i0 + c] = zb[h * CB + c];
        }
    }
    free(k);
    free(mp);
    return 0;
}

/* exp(x) for x <= 0 (softmax after subtracting the maximum), 8 lanes: x = n ln2 + r with |r| <= ln2/2,
 * exp(r) by Cephes' expf polynomial (about 1 ulp), 2^n put in the exponent bits; below -87.3
 * (including -inf) it is 0. */
static inline v8f exp8_nonpos(v8f x) {
    const v8i under = x < -87.3f;
    x = (v8f) ((v8i) x & ~under);  /* 0 where under, so the arithmetic below stays finite */
    const v8i n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, v8i);  /* rounds, as x <= 0 */
    const v8f nf = __builtin_convertvector(n, v8f);
    const v8f r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    v8f p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const v8i bits = ((n + 127) << 23) & ~under;  /* 0.0f where under */
    return p * (v8f) bits;
}

/* z[i] = exp(z[i] - mx) in place for z[i] <= mx (-inf gives 0); returns their sum. */
static double exp_shifted(float * z, int64_t n, float mx) {
    double sum = 0.0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const v8f e = exp8_nonpos(load8(z + i) - mx);
        memcpy(z + i, &e, sizeof e);
        sum += hsum(e);
    }
    for (; i < n; ++i) {
        z[i] = expf(z[i] - mx);
        sum += z[i];
    }
    return sum;
}

int32_t llamakv_ea_attention(float * z, int64_t n_cells, int32_t n_head, int32_t n_head_kv, const uint8_t * scored,
                             const float * sinks, const float * vnorm, int64_t vnorm_stride, float epsilon,
                             float * out) {
    const int32_t group = n_head / n_head_kv;
    float * inv_sum = malloc(n_head * sizeof(float));
    if (inv_sum == NULL) return ERR_NO_MEMORY;
    for (int32_t h = 0; h < n_head; ++h) {
        float * zh = z + (int64_t) h * n_cells;
        float mx = -INFINITY;
        for (int64_t i = 0; i < n_cells; ++i) {
            if (!scored[i]) zh[i] = -INFINITY;
            else if (zh[i] > mx) mx = zh[i];
        }
        if (sinks != NULL && sinks[h] > mx) mx = sinks[h];
        if (mx == -INFINITY) mx = 0.0f;  /* nothing scored: every exp below is 0 */
        /* a learned sink takes its share of the softmax without a cell (GPT-OSS) */
        const double sum = exp_shifted(zh, n_cells, mx) + (sinks != NULL ? exp((double) sinks[h] - mx) : 0.0);
        inv_sum[h] = sum > 0.0 ? (float) (1.0 / (sum * group)) : 0.0f;
    }
    for (int32_t g = 0; g < n_head_kv; ++g) {
        float * o = out + (int64_t) g * n_cells;
        for (int64_t i = 0; i < n_cells; ++i) o[i] = 0.0f;
        for (int32_t h = g * group; h < (g + 1) * group; ++h) {
            const float * zh = z + (int64_t) h * n_cells;
            const float w = inv_sum[h];
            for (int64_t i = 0; i < n_cells; ++i) o[i] += zh[i] * w;
        }
        for (int64_t i = 0; i < n_cells; ++i) {
            if (!scored[i]) o[i] = INFINITY;
            else if (vnorm != NULL) o[i] = (o[i] + epsilon) * vnorm[i * vnorm_stride + g];
        }
    }
    free(inv_sum);
    return 0;
}

int32_t llamakv_key_anchor(const uint8_t * rows, int32_t type, int64_t row_bytes, int64_t n_cells,
                           int32_t n_head_kv, int32_t head_dim, const uint8_t * scored, int64_t stride,
                           float * anchor) {
    if (check_type(type)) return ERR_BAD_TYPE;
    const int64_t per_row = (int64_t) n_head_kv * head_dim;
    float * k = malloc(per_row * sizeof(float));
    double * sum = calloc(per_row, sizeof(double));
    if (k == NULL || sum == NULL) { free(k); free(sum); return ERR_NO_MEMORY; }
    bool any = false;
    for (int64_t i = 0; i < n_cells; ++i) any = any || scored[i];
    if (stride < 1) stride = 1;
    int64_t used = 0;
    for (int pass = 0; pass < 2 && used == 0; ++pass, stride = 1) {  /* a sample with no scored cell: all */
        for (int64_t i = stride / 2; i < n_cells; i += stride) {
            if (any && !scored[i]) continue;
            row_to_float(rows + i * row_bytes, type, per_row, k);
            for (int32_t h = 0; h < n_head_kv; ++h) {
                const float * x = k + (int64_t) h * head_dim;
                const double inv = 1.0 / fmax(sqrt((double) dot_f32(x, x, head_dim)), 1e-6);
                double * acc = sum + (int64_t) h * head_dim;
                for (int32_t j = 0; j < head_dim; ++j) acc[j] += x[j] * inv;
            }
            ++used;
        }
    }
    for (int32_t h = 0; h < n_head_kv; ++h) {
        const double * m = sum + (int64_t) h * head_dim;
        double sq = 0.0;
        for (int32_t j = 0; j < head_dim; ++j) sq += m[j] * m[j];
        const double inv = 1.0 / fmax(sqrt(sq), 1e-30);
        for (int32_t j = 0; j < head_dim; ++j) anchor[(int64_t) h * head_dim + j] = (float) (m[j] * inv);
    }
    free(k);
    free(sum);
    return 0;
}

int32_t llamakv_keydiff_scores(const uint8_t * rows, int32_t type, int64_t row_bytes, int64_t n_cells,
                               int32_t n_head_kv, int32_t head_dim, const float * anchor, float * out) {
    if (check_type(type)) return ERR_BAD_TYPE;
    const int64_t per_row = (int64_t) n_head_kv * head_dim;
    float * k = malloc(per_row * sizeof(float));
    if (k == NULL) return ERR_NO_MEMORY;
    for (int64_t i = 0; i < n_cells; ++i) {
        row_to_float(rows + i * row_bytes, type, per_row, k);
        for (int32_t h = 0; h < n_head_kv; ++h) {
            const float * x = k + (int64_t) h * head_dim;
            const float norm = sqrtf(dot_f32(x, x, head_dim));
            out[(int64_t) h * n_cells + i] = -dot_f32(x, anchor + (int64_t) h * head_dim, head_dim) / fmaxf(norm, 1e-6f);
        }
    }
    free(k);
    return 0;
}

enum { KB = 64 };

/* z[r][c] = q[r] . k[c] for the n_rows query rows q (stride d) and a block of KB cells whose keys
 * are transposed, kt[j][c]: 4 rows x 2 vectors of cells of accumulators, each key vector loaded
 * once per 4 rows and each query element broadcast: no horizontal sums, and stores along the rows
 * of z (dot_block's cells x rows blocks need both; with them this kernel took about twice as
 * long). z rows are zs apart; only nb cells stored. */
static void logits_block(const float * q, int32_t n_rows, int32_t d, const float * kt, int32_t nb, float * z,
                         int64_t zs) {
    for (int32_t r0 = 0; r0 < n_rows; r0 += 4) {
        const int32_t nr = n_rows - r0 < 4 ? n_rows - r0 : 4;
        const float * q0 = q + (int64_t) r0 * d, * q1 = q0 + (nr > 1 ? d : 0), * q2 = q0 + (nr > 2 ? 2 * d : 0),
                    * q3 = q0 + (nr > 3 ? 3 * d : 0);  /* rows past the end repeat the first (not stored) */
        for (int32_t c0 = 0; c0 < nb; c0 += 2 * VW) {
            vwf a[4][2] = {{{0}}};
            for (int32_t j = 0; j < d; ++j) {
                const vwf x0 = loadw(kt + j * KB + c0), x1 = loadw(kt + j * KB + c0 + VW);
                const vwf y0 = (vwf) {0} + q0[j], y1 = (vwf) {0} + q1[j], y2 = (vwf) {0} + q2[j],
                          y3 = (vwf) {0} + q3[j];
                a[0][0] += y0 * x0; a[0][1] += y0 * x1;
                a[1][0] += y1 * x0; a[1][1] += y1 * x1;
                a[2][0] += y2 * x0; a[2][1] += y2 * x1;
                a[3][0] += y3 * x0; a[3][1] += y3 * x1;
            }
            const int32_t nc = nb - c0 < 2 * VW ? nb - c0 : 2 * VW;
            for (int32_t r = 0; r < nr; ++r) {
                float tmp[2 * VW];
                memcpy(tmp, &a[r][0], sizeof a[r][0]);
                memcpy(tmp + VW, &a[r][1], sizeof a[r][1]);
                memcpy(z + (int64_t) (r0 + r) * zs + c0, tmp, nc * sizeof(float));
            }
        }
    }
}

int32_t llamakv_window_attention(const uint8_t * rows, int32_t type, int64_t row_bytes, int64_t n_cells,
                                 int32_t n_head, int32_t n_head_kv, int32_t head_dim, const float * q, int32_t n_q,
                                 const int64_t * qpos, const int64_t * cell_pos, const uint8_t * scored,
                                 float * out) {
    if (check_type(type)) return ERR_BAD_TYPE;
    const int32_t group = n_head / n_head_kv, d = head_dim, R = group * n_q;  /* query rows per KV head */
    const int64_t blck = ggml_blck_size((enum ggml_type) type);
    if (d % 8 != 0 || d % blck != 0 || n_q <= 0) return ERR_BAD_SHAPE;
    float * z = malloc(((int64_t) R * n_cells + 2 * KB * d + 2 * n_cells) * sizeof(float));
    if (z == NULL) return ERR_NO_MEMORY;
    float * k = z + (int64_t) R * n_cells, * kt = k + KB * d, * sink_mask = kt + KB * d;
    int32_t * pos = (int32_t *) (sink_mask + n_cells);  /* llama_pos is 32 bits */
    for (int64_t i = 0; i < n_cells; ++i) {
        sink_mask[i] = scored[i] ? 0.0f : -INFINITY;
        pos[i] = (int32_t) cell_pos[i];
    }
    for (int32_t g = 0; g < n_head_kv; ++g) {
        const size_t off = ggml_row_size((enum ggml_type) type, (int64_t) g * d);  /* head g's keys in a row */
        for (int64_t i0 = 0; i0 < n_cells; i0 += KB) {  /* logits of every query row, KB cells at a time */
            const int32_t nb = n_cells - i0 < KB ? (int32_t) (n_cells - i0) : KB;
            for (int32_t c = 0; c < nb; ++c) row_to_float(rows + (i0 + c) * row_bytes + off, type, d, k + c * d);
            for (int32_t j = 0; j < d; ++j)
                for (int32_t c = 0; c < KB; ++c) kt[j * KB + c] = c < nb ? k[c * d + j] : 0.0f;
            logits_block(q + (int64_t) g * R * d, R, d, kt, nb, z + i0, n_cells);
        }
        for (int32_t h = 0; h < group; ++h) {
            float * o = out + (int64_t) (g * group + h) * n_cells;
            for (int64_t i = 0; i < n_cells; ++i) o[i] = 0.0f;
            for (int32_t w = 0; w < n_q; ++w) {  /* softmax over the cells this query sees, then their mean */
                float * zr = z + (int64_t) (h * n_q + w) * n_cells;
                const int32_t qp = (int32_t) qpos[w];
                v8f mx8 = (v8f) {0} - INFINITY;
                int64_t i = 0;
                for (; i + 8 <= n_cells; i += 8) {
                    v8i p8;
                    memcpy(&p8, pos + i, sizeof p8);
                    const v8f x = load8(zr + i) + load8(sink_mask + i);
                    const v8i hidden = p8 > qp;  /* after the query */
                    const v8f v = (v8f) (((v8i) x & ~hidden) | ((v8i) ((v8f) {0} - INFINITY) & hidden));
                    memcpy(zr + i, &v, sizeof v);
                    const v8i more = v > mx8;
                    mx8 = (v8f) (((v8i) v & more) | ((v8i) mx8 & ~more));
                }
                float mx = -INFINITY;
                for (int u = 0; u < 8; ++u) mx = mx8[u] > mx ? mx8[u] : mx;
                for (; i < n_cells; ++i) {
                    zr[i] = pos[i] > qp ? -INFINITY : zr[i] + sink_mask[i];
                    if (zr[i] > mx) mx = zr[i];
                }
                if (mx == -INFINITY) continue;  /* sees nothing */
                const float w_inv = (float) (1.0 / (exp_shifted(zr, n_cells, mx) * n_q));
                for (int64_t j = 0; j < n_cells; ++j) o[j] += zr[j] * w_inv;
            }
        }
    }
    free(z);
    return 0;
}

int32_t llamakv_value_norms(const uint8_t * data, int32_t type, int64_t row_bytes, int64_t n_cells,
                            int32_t n_head_kv, int32_t head_dim, int32_t transposed, float * out) {
    if (check_type(type)) return ERR_BAD_TYPE;
    const int64_t per_row = (int64_t) n_head_kv * head_dim;
    if (!transposed) {
        float * v = malloc(per_row * sizeof(float));
        if (v == NULL) return ERR_NO_MEMORY;
        for (int64_t i = 0; i < n_cells; ++i) {
            row_to_float(data + i * row_bytes, type, per_row, v);
            for (int32_t h = 0; h < n_head_kv; ++h) {
                const float * x = v + (int64_t) h * head_dim;
                out[i * n_head_kv + h] = sqrtf(dot_f32(x, x, head_dim));
            }
        }
        free(v);
        return 0;
    }
    /* transposed: row j holds dimension j of every cell */
    float * v = malloc(n_cells * sizeof(float));
    double * acc = malloc(n_cells * sizeof(double));
    if (v == NULL || acc == NULL) { free(v); free(acc); return ERR_NO_MEMORY; }
    for (int32_t h = 0; h < n_head_kv; ++h) {
        for (int64_t i = 0; i < n_cells; ++i) acc[i] = 0.0;
        for (int32_t j = 0; j < head_dim; ++j) {
            row_to_float(data + (int64_t) (h * head_dim + j) * row_bytes, type, n_cells, v);
            for (int64_t i = 0; i < n_cells; ++i) acc[i] += (double) v[i] * v[i];
        }
        for (int64_t i = 0; i < n_cells; ++i) out[i * n_head_kv + h] = (float) sqrt(acc[i]);
    }
    free(v);
    free(acc);
    return 0;
}

void llamakv_surprisal(const float * logits, int64_t n_rows, int64_t n_vocab, const int32_t * next_tokens,
                       float * out) {
    for (int64_t r = 0; r < n_rows; ++r) {  /* a log-sum-exp over the vocabulary, 8 lanes at a time */
        const float * x = logits + r * n_vocab;
        v8f m8;
        for (int k = 0; k < 8; ++k) m8[k] = -INFINITY;
        int64_t j = 0;
        for (; j + 8 <= n_vocab; j += 8) {
            const v8f v = load8(x + j);
            const v8i gt = v > m8;
            m8 = (v8f) (((v8i) v & gt) | ((v8i) m8 & ~gt));
        }
        float mx = m8[0];
        for (int k = 1; k < 8; ++k) mx = fmaxf(mx, m8[k]);
        for (; j < n_vocab; ++j) mx = fmaxf(mx, x[j]);
        v8f s8 = {0};
        for (j = 0; j + 8 <= n_vocab; j += 8) s8 += exp8_nonpos(load8(x + j) - mx);
        double sum = hsum(s8);
        for (; j < n_vocab; ++j) sum += expf(x[j] - mx);
        out[r] = (float) (log(sum) + mx - x[next_tokens[r]]);
    }
}

void llamakv_gather_rows(const uint8_t * src, uint8_t * dst, int64_t row_bytes, const int64_t * idx, int64_t n) {
    for (int64_t i = 0; i < n; ++i) memcpy(dst + i * row_bytes, src + idx[i] * row_bytes, row_bytes);
}

void llamakv_gather_cols(const uint8_t * src, uint8_t * dst, int64_t n_rows, int64_t n_cols, int64_t elem,
                         const int64_t * idx, int64_t n_idx) {
    for (int64_t r = 0; r < n_rows; ++r) {
        const uint8_t * s = src + r * n_cols * elem;
        uint8_t * d = dst + r * n_idx * elem;
        switch (elem) {
            case 2:
                for (int64_t i = 0; i < n_idx; ++i) ((uint16_t *) d)[i] = ((const uint16_t *) s)[idx[i]];
                break;
            case 4:
                for (int64_t i = 0; i < n_idx; ++i) ((uint32_t *) d)[i] = ((const uint32_t *) s)[idx[i]];
                break;
            default:
                for (int64_t i = 0; i < n_idx; ++i) memcpy(d + i * elem, s + idx[i] * elem, elem);
        }
    }
}

/* ---- switching the callback on and off between decode calls --------------------------------- */

/* llama.cpp hands the eval callback to its scheduler when it builds a graph (from the context's
 * cparams), and with a callback installed the scheduler synchronises after every split, so the
 * CPU no longer prepares the next ubatch while the GPU computes (measured: +14% prefill time on
 * an H100 with nothing captured). To pay that only for the ubatches whose queries are wanted, the
 * callback is switched in both places: the scheduler (llama_context::get_sched, exported by
 * libllama) and the cparams copy, found once by its unique (callback, user data) pair. */
typedef struct ggml_backend_sched * (*get_sched_fn)(const void * ctx);

int64_t llamakv_find_callback_slot(const void * ctx, const void * cb, const void * ud) {
    const char * p = (const char *) ctx;
    int64_t found = -1;
    for (int64_t off = 0; off + 16 <= 1024; off += 8) {
        const void * a, * b;
        memcpy(&a, p + off, sizeof a);
        memcpy(&b, p + off + 8, sizeof b);
        if (a == cb && b == ud) {
            if (found >= 0) return -1;
            found = off;
        }
    }
    return found;
}

void llamakv_switch_callback(void * ctx, int64_t slot, void * get_sched, void * cb, void * ud) {
    memcpy((char *) ctx + slot, &cb, sizeof cb);
    memcpy((char *) ctx + slot + 8, &ud, sizeof ud);
    ggml_backend_sched_set_eval_callback(((get_sched_fn) get_sched)(ctx), (ggml_backend_sched_eval_callback) cb, ud);
}

/* Pinned host memory from the first GPU's host buffer type (NULL without a GPU backend): device
 * copies into it run at bus speed instead of through the driver's bounce buffers. */
void * llamakv_pinned_alloc(size_t size, void ** handle) {
    *handle = NULL;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        if (ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_GPU) continue;
        ggml_backend_buffer_type_t buft = ggml_backend_dev_host_buffer_type(dev);
        if (buft == NULL) continue;
        ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(buft, size);
        if (buf == NULL) return NULL;
        *handle = buf;
        return ggml_backend_buffer_get_base(buf);
    }
    return NULL;
}

void llamakv_pinned_free(void * handle) {
    if (handle != NULL) ggml_backend_buffer_free((ggml_backend_buffer_t) handle);
}
