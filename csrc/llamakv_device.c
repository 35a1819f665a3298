/* llamakv shim, device part: Expected Attention's scores computed where the KV cache lives.
 *
 * The host path reads a sequence's whole state (every layer's K and V) into host memory and scores
 * it there; on a GPU that moves the cache over the bus twice per compression. Here the same scores
 * come from a ggml graph run on the backend that holds the cache tensors, reading them in place:
 * per layer the keys of the sequence's cells are converted to float (get_rows, which also
 * dequantizes), the closed-form logits are three matrix products of the per-head weights with
 * k, k*k and the products of RoPE's pairs, then the soft cap, the softmax over the scored cells
 * (with the learned sinks), the GQA group mean and the value norms, as llamakv_ea_attention does on
 * the host; KeyDiff's cosines come from the same converted keys. Only the scores are copied back.
 * Cells are processed in chunks so that the float copies stay small at long contexts.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "llamakv_shim.h"

enum { DEV_ERR_NO_MEMORY = 6, DEV_ERR_DEVICE = 7, DEV_ERR_SHAPE = 8 };
enum { MAX_DEVICES = 16, CHUNK_CELLS = 16384, MAX_NODES = 2048 };

typedef struct {
    ggml_backend_dev_t dev;
    ggml_backend_t backend;
    ggml_gallocr_t galloc;   /* intermediates, reused from one compression to the next */
} device_slot;

static device_slot slots[MAX_DEVICES];
static int n_slots;
static pthread_mutex_t slots_lock = PTHREAD_MUTEX_INITIALIZER;

static int run_warmup(ggml_backend_t backend);

static void set_threads(ggml_backend_dev_t dev, ggml_backend_t backend, int32_t n_threads) {
    if (n_threads <= 0) return;
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    typedef void (*set_fn)(ggml_backend_t, int);
    set_fn f = reg != NULL ? (set_fn) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads") : NULL;
    if (f != NULL) f(backend, n_threads);
}

void * llamakv_device_backend(void * tensor, int32_t n_threads) {
    const struct ggml_tensor * t = (const struct ggml_tensor *) tensor;
    if (t == NULL || t->buffer == NULL) return NULL;
    ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(t->buffer);
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    if (dev == NULL && ggml_backend_buffer_is_host(t->buffer)) {
        dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);  /* the CPU buffer type names no device */
    }
    if (dev == NULL || ggml_backend_dev_buffer_type(dev) != buft) return NULL;
    pthread_mutex_lock(&slots_lock);
    device_slot * s = NULL;
    for (int i = 0; i < n_slots; ++i) {
        if (slots[i].dev == dev) s = &slots[i];
    }
    if (s == NULL && n_slots < MAX_DEVICES) {
        ggml_backend_t backend = ggml_backend_dev_init(dev, NULL);
        set_threads(dev, backend, n_threads);
        const bool gpu = ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU;
        if (backend != NULL && (!gpu || run_warmup(backend) == 0)) {
            s = &slots[n_slots++];
            s->dev = dev;
            s->backend = backend;
            s->galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend));
        } else if (backend != NULL) {
            ggml_backend_free(backend);
        }
    } else if (s != NULL) {
        set_threads(dev, s->backend, n_threads);
    }
    pthread_mutex_unlock(&slots_lock);
    return s != NULL ? (void *) s : NULL;
}

int32_t llamakv_device_is_gpu(void * slot) {
    return slot != NULL && ggml_backend_dev_type(((device_slot *) slot)->dev) != GGML_BACKEND_DEVICE_TYPE_CPU;
}

const char * llamakv_device_name(void * slot) {
    return slot != NULL ? ggml_backend_dev_name(((device_slot *) slot)->dev) : "";
}

static struct ggml_context * graph_context(void) {
    struct ggml_init_params p = {
        /*.mem_size   =*/ ggml_tensor_overhead() * MAX_NODES * 2 + ggml_graph_overhead_custom(MAX_NODES, false),
        /*.mem_buffer =*/ NULL,
        /*.no_alloc   =*/ true,
    };
    return ggml_init(p);
}

/* A small product of the kind the scores use, so that a GPU backend's lazily created handles and
 * kernels exist before the first compression needs them. */
static int run_warmup(ggml_backend_t backend) {
    struct ggml_context * ctx = graph_context();
    if (ctx == NULL) return DEV_ERR_NO_MEMORY;
    struct ggml_tensor * a = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 64, 256, 2);
    struct ggml_tensor * b = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 64, 4, 2);
    ggml_set_input(a);
    ggml_set_input(b);
    struct ggml_tensor * z = ggml_soft_max(ctx, ggml_mul_mat(ctx, a, b));
    ggml_set_output(z);
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, z);
    int err = 0;
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
    if (buf == NULL) {
        err = DEV_ERR_NO_MEMORY;
    } else {
        ggml_backend_buffer_clear(buf, 0);
        if (ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) err = DEV_ERR_DEVICE;
        ggml_backend_buffer_free(buf);
    }
    ggml_free(ctx);
    return err;
}

/* The inputs of one layer's graph, allocated in their own buffer and filled from the host. */
typedef struct {
    struct ggml_tensor * idx, * anchor_idx, * mask, * w_lin, * w_sq, * w_cross, * sinks;
} layer_inputs;

/* k [d, n, n_head_kv] (float, cells in dim 1): the KeyDiff cosines summed over heads [1, n]
 * (without the sign) and the logits [n, group, n_head_kv]. */
static struct ggml_tensor * chunk_logits(struct ggml_context * ctx, struct ggml_tensor * kp, const layer_inputs * in,
                                         int32_t n_pairs, int32_t pair_kind, struct ggml_tensor * anchor,
                                         struct ggml_tensor ** cos_sum) {
    const int64_t d = kp->ne[0], n = kp->ne[1], hkv = kp->ne[2];
    struct ggml_tensor * sq = ggml_sqr(ctx, kp);
    struct ggml_tensor * z = ggml_add(ctx, ggml_mul_mat(ctx, kp, in->w_lin), ggml_mul_mat(ctx, sq, in->w_sq));
    if (n_pairs > 0) {
        struct ggml_tensor * ka, * kb;
        if (pair_kind == 1) {  /* NEOX: (p, P + p) */
            ka = ggml_view_3d(ctx, kp, n_pairs, n, hkv, kp->nb[1], kp->nb[2], 0);
            kb = ggml_view_3d(ctx, kp, n_pairs, n, hkv, kp->nb[1], kp->nb[2], n_pairs * sizeof(float));
        } else {  /* normal: (2p, 2p + 1) */
            struct ggml_tensor * k4 = ggml_reshape_4d(ctx, kp, 2, d / 2, n, hkv);
            ka = ggml_view_4d(ctx, k4, 1, n_pairs, n, hkv, k4->nb[1], k4->nb[2], k4->nb[3], 0);
            kb = ggml_view_4d(ctx, k4, 1, n_pairs, n, hkv, k4->nb[1], k4->nb[2], k4->nb[3], sizeof(float));
        }
        struct ggml_tensor * cross = ggml_reshape_3d(ctx, ggml_mul(ctx, ka, kb), n_pairs, n, hkv);
        z = ggml_add(ctx, z, ggml_mul_mat(ctx, cross, in->w_cross));
    }
    if (anchor != NULL) {
        struct ggml_tensor * dot = ggml_reshape_2d(ctx, ggml_mul_mat(ctx, kp, anchor), n, hkv);  /* [n, hkv] */
        struct ggml_tensor * norm = ggml_sqrt(ctx, ggml_sum_rows(ctx, sq));                    /* [1, n, hkv] */
        norm = ggml_clamp(ctx, ggml_reshape_2d(ctx, norm, n, hkv), 1e-6f, INFINITY);
        struct ggml_tensor * cos = ggml_div(ctx, dot, norm);
        *cos_sum = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_transpose(ctx, cos)));            /* [1, n] */
    }
    return z;
}

/* Float keys [d, n, n_head_kv] of the cells idx of a cache tensor's stream. */
static struct ggml_tensor * keys_of(struct ggml_context * ctx, struct ggml_tensor * k, int32_t stream,
                                    struct ggml_tensor * idx, int64_t d, int64_t hkv) {
    struct ggml_tensor * rows = ggml_view_2d(ctx, k, k->ne[0], k->ne[1], k->nb[1], (size_t) stream * k->nb[2]);
    struct ggml_tensor * kf = ggml_get_rows(ctx, rows, idx);  /* [d * hkv, n] float */
    struct ggml_tensor * k3 = ggml_reshape_3d(ctx, kf, d, hkv, idx->ne[0]);
    return ggml_cont(ctx, ggml_permute(ctx, k3, 0, 2, 1, 3));
}

/* Value norms [1, n, n_head_kv] of cells c0 .. c0 + n - 1 (rows) or of the same cells of a
 * transposed V (a row of kv_size cells per dimension). */
static struct ggml_tensor * value_norms(struct ggml_context * ctx, struct ggml_tensor * v, int32_t v_trans, int32_t stream,
                                        struct ggml_tensor * idx, int64_t c0, int64_t n, int64_t dv, int64_t hkv) {
    if (!v_trans) {
        struct ggml_tensor * rows = ggml_view_2d(ctx, v, v->ne[0], v->ne[1], v->nb[1], (size_t) stream * v->nb[2]);
        struct ggml_tensor * vf = ggml_reshape_3d(ctx, ggml_get_rows(ctx, rows, idx), dv, hkv, n);
        struct ggml_tensor * s = ggml_sqrt(ctx, ggml_sum_rows(ctx, ggml_sqr(ctx, vf)));  /* [1, hkv, n] */
        return ggml_cont(ctx, ggml_permute(ctx, s, 0, 2, 1, 3));
    }
    const size_t el = ggml_type_size(v->type);
    const int64_t kv_size = v->ne[1];
    struct ggml_tensor * cols = ggml_view_2d(ctx, v, n, dv * hkv, kv_size * el,
                                             (size_t) stream * v->nb[2] + (size_t) c0 * el);   /* [n, dims] */
    struct ggml_tensor * vf = ggml_sqr(ctx, ggml_cast(ctx, cols, GGML_TYPE_F32));
    struct ggml_tensor * v3 = ggml_cont(ctx, ggml_permute(ctx, ggml_reshape_3d(ctx, vf, n, dv, hkv), 1, 0, 2, 3));
    return ggml_sqrt(ctx, ggml_sum_rows(ctx, v3));  /* [1, n, hkv] */
}

static struct ggml_tensor * concat_or(struct ggml_context * ctx, struct ggml_tensor * acc, struct ggml_tensor * x, int dim) {
    return acc == NULL ? x : ggml_concat(ctx, acc, x, dim);
}

typedef struct {
    const float * w;
    const float * sinks;    /* NULL: none */
    float cap;
} layer_params;

static int32_t score_layer(device_slot * s, struct ggml_tensor * k, struct ggml_tensor * v, int32_t v_trans,
                           int32_t stream, int64_t n, int32_t n_head, int32_t hkv, int32_t d,
                           const layer_params * lp, int32_t n_pairs, int32_t pair_kind, const uint8_t * scored,
                           int32_t use_vnorm, float epsilon, const int32_t * anchor_cells, int64_t n_anchor,
                           float * out, float * keydiff_sum) {
    const int32_t group = n_head / hkv;
    if (k->ne[0] != (int64_t) d * hkv || (use_vnorm && (v == NULL || v->ne[0] % hkv != 0)) || n > k->ne[1] ||
        stream >= k->ne[2] || (pair_kind == 2 && d % 2 != 0) || 2 * n_pairs > d) {
        return DEV_ERR_SHAPE;
    }
    const int64_t dv = use_vnorm ? v->ne[0] / hkv : 0;
    struct ggml_context * ictx = graph_context();
    struct ggml_context * ctx = graph_context();
    if (ictx == NULL || ctx == NULL) { if (ictx) ggml_free(ictx); if (ctx) ggml_free(ctx); return DEV_ERR_NO_MEMORY; }
    layer_inputs in = {0};
    in.idx = ggml_new_tensor_1d(ictx, GGML_TYPE_I32, n);
    in.mask = ggml_new_tensor_3d(ictx, GGML_TYPE_F32, n, 1, 1);
    in.w_lin = ggml_new_tensor_3d(ictx, GGML_TYPE_F32, d, group, hkv);
    in.w_sq = ggml_new_tensor_3d(ictx, GGML_TYPE_F32, d, group, hkv);
    in.w_cross = n_pairs > 0 ? ggml_new_tensor_3d(ictx, GGML_TYPE_F32, n_pairs, group, hkv) : NULL;
    in.anchor_idx = n_anchor > 0 ? ggml_new_tensor_1d(ictx, GGML_TYPE_I32, n_anchor) : NULL;
    in.sinks = lp->sinks != NULL ? ggml_new_tensor_1d(ictx, GGML_TYPE_F32, n_head) : NULL;

    ggml_backend_buffer_t in_buf = ggml_backend_alloc_ctx_tensors(ictx, s->backend);
    int32_t err = 0;
    if (in_buf == NULL) { err = DEV_ERR_NO_MEMORY; goto done; }
    {
        /* inputs from the host */
        int32_t * idx = malloc(n * sizeof(int32_t));
        float * mask = malloc(n * sizeof(float));
        const int64_t wrow = 2 * (int64_t) d + n_pairs;
        float * wl = malloc((size_t) n_head * d * sizeof(float));
        float * wq = malloc((size_t) n_head * d * sizeof(float));
        float * wc = malloc((size_t) n_head * (n_pairs > 0 ? n_pairs : 1) * sizeof(float));
        if (idx == NULL || mask == NULL || wl == NULL || wq == NULL || wc == NULL) {
            free(idx); free(mask); free(wl); free(wq); free(wc);
            err = DEV_ERR_NO_MEMORY;
            goto done;
        }
        for (int64_t i = 0; i < n; ++i) { idx[i] = (int32_t) i; mask[i] = scored[i] ? 0.0f : -INFINITY; }
        for (int32_t h = 0; h < n_head; ++h) {
            memcpy(wl + (int64_t) h * d, lp->w + h * wrow, d * sizeof(float));
            memcpy(wq + (int64_t) h * d, lp->w + h * wrow + d, d * sizeof(float));
            if (n_pairs > 0) memcpy(wc + (int64_t) h * n_pairs, lp->w + h * wrow + 2 * d, n_pairs * sizeof(float));
        }
        ggml_backend_tensor_set(in.idx, idx, 0, ggml_nbytes(in.idx));
        ggml_backend_tensor_set(in.mask, mask, 0, ggml_nbytes(in.mask));
        ggml_backend_tensor_set(in.w_lin, wl, 0, ggml_nbytes(in.w_lin));
        ggml_backend_tensor_set(in.w_sq, wq, 0, ggml_nbytes(in.w_sq));
        if (in.w_cross != NULL) ggml_backend_tensor_set(in.w_cross, wc, 0, ggml_nbytes(in.w_cross));
        if (in.anchor_idx != NULL) ggml_backend_tensor_set(in.anchor_idx, anchor_cells, 0, ggml_nbytes(in.anchor_idx));
        if (in.sinks != NULL) ggml_backend_tensor_set(in.sinks, lp->sinks, 0, ggml_nbytes(in.sinks));
        free(idx); free(mask); free(wl); free(wq); free(wc);
    }
    {
        struct ggml_cgraph * gf = ggml_new_graph_custom(ctx, MAX_NODES, false);
        struct ggml_tensor * anchor = NULL;
        if (in.anchor_idx != NULL) {
            /* the normalised mean of the normalised sampled keys, per KV head: [d, 1, hkv] */
            struct ggml_tensor * ks = keys_of(ctx, k, stream, in.anchor_idx, d, hkv);  /* [d, S, hkv] */
            ks = ggml_l2_norm(ctx, ks, 1e-6f);
            struct ggml_tensor * m = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, ks, 1, 0, 2, 3)));  /* [1, d, hkv] */
            anchor = ggml_l2_norm(ctx, ggml_reshape_3d(ctx, m, d, 1, hkv), 1e-30f);
        }
        struct ggml_tensor * z = NULL, * kd = NULL, * vn = NULL;
        for (int64_t c0 = 0; c0 < n; c0 += CHUNK_CELLS) {
            const int64_t nc = n - c0 < CHUNK_CELLS ? n - c0 : CHUNK_CELLS;
            struct ggml_tensor * idx_c = ggml_view_1d(ctx, in.idx, nc, (size_t) c0 * sizeof(int32_t));
            struct ggml_tensor * kp = keys_of(ctx, k, stream, idx_c, d, hkv);
            struct ggml_tensor * cos_sum = NULL;
            z = concat_or(ctx, z, chunk_logits(ctx, kp, &in, n_pairs, pair_kind, anchor, &cos_sum), 0);
            if (cos_sum != NULL) kd = concat_or(ctx, kd, cos_sum, 1);
            if (use_vnorm) vn = concat_or(ctx, vn, value_norms(ctx, v, v_trans, stream, idx_c, c0, nc, dv, hkv), 1);
        }
        if (lp->cap > 0.0f) z = ggml_scale(ctx, ggml_tanh(ctx, ggml_scale(ctx, z, 1.0f / lp->cap)), lp->cap);
        z = ggml_reshape_3d(ctx, ggml_add(ctx, z, in.mask), n, 1, n_head);  /* row h = g * group + j */
        struct ggml_tensor * p = ggml_soft_max(ctx, z);
        if (in.sinks != NULL) ggml_soft_max_add_sinks(p, in.sinks);
        p = ggml_reshape_3d(ctx, p, n, group, hkv);
        struct ggml_tensor * gm = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, p, 1, 0, 2, 3)));  /* [1, n, hkv] */
        struct ggml_tensor * score = use_vnorm ? ggml_mul(ctx, ggml_scale_bias(ctx, gm, 1.0f / group, epsilon), vn)
                                               : ggml_scale(ctx, gm, 1.0f / group);
        ggml_set_output(score);
        ggml_build_forward_expand(gf, score);
        if (kd != NULL) {
            kd = ggml_scale(ctx, kd, -1.0f);
            ggml_set_output(kd);
            ggml_build_forward_expand(gf, kd);
        }
        if (!ggml_gallocr_alloc_graph(s->galloc, gf)) { err = DEV_ERR_NO_MEMORY; goto done; }
        if (ggml_backend_graph_compute(s->backend, gf) != GGML_STATUS_SUCCESS) { err = DEV_ERR_DEVICE; goto done; }
        ggml_backend_tensor_get(score, out, 0, (size_t) n * hkv * sizeof(float));  /* [hkv][n] */
        if (kd != NULL && keydiff_sum != NULL) ggml_backend_tensor_get(kd, keydiff_sum, 0, (size_t) n * sizeof(float));
        for (int32_t g = 0; g < hkv; ++g) {
            for (int64_t i = 0; i < n; ++i) {
                if (!scored[i]) out[(int64_t) g * n + i] = INFINITY;
            }
        }
    }
done:
    if (in_buf != NULL) ggml_backend_buffer_free(in_buf);
    ggml_free(ictx);
    ggml_free(ctx);
    return err;
}

int32_t llamakv_device_ea_scores(void * backend, void ** k_cache, void ** v_cache, const int32_t * v_trans,
                                 int32_t n_layer, int32_t stream, int64_t n_cells, int32_t n_head, int32_t n_head_kv,
                                 int32_t head_dim, const float * w, int32_t n_pairs, int32_t pair_kind,
                                 const float * caps, const float * sinks, const uint8_t * scored, int32_t use_vnorm,
                                 float epsilon, const int32_t * anchor_cells, int64_t n_anchor, float * out,
                                 float * keydiff_sums) {
    device_slot * s = (device_slot *) backend;
    if (s == NULL || n_head_kv <= 0 || n_head % n_head_kv != 0 || n_cells <= 0) return DEV_ERR_SHAPE;
    if (n_pairs == 0) pair_kind = 0;
    const int64_t wrow = 2 * (int64_t) head_dim + n_pairs;
    for (int32_t l = 0; l < n_layer; ++l) {
        struct ggml_tensor * k = (struct ggml_tensor *) k_cache[l];
        struct ggml_tensor * v = use_vnorm ? (struct ggml_tensor *) v_cache[l] : NULL;
        if (k == NULL) return DEV_ERR_SHAPE;
        const float * sk = NULL;
        if (sinks != NULL && !isnan(sinks[(int64_t) l * n_head])) sk = sinks + (int64_t) l * n_head;
        const layer_params lp = { w + (int64_t) l * n_head * wrow, sk, caps != NULL ? caps[l] : 0.0f };
        const int32_t err = score_layer(s, k, v, use_vnorm ? v_trans[l] : 0, stream, n_cells, n_head, n_head_kv,
                                        head_dim, &lp, n_pairs, pair_kind, scored, use_vnorm, epsilon, anchor_cells,
                                        n_anchor, out + (int64_t) l * n_head_kv * n_cells,
                                        keydiff_sums != NULL ? keydiff_sums + (int64_t) l * n_cells : NULL);
        if (err) return err;
    }
    return 0;
}

/* The bytes of a cache tensor's stream seen as 32-bit words, a row per cell: gathers move cells of
 * any type (quantized included) unchanged. NULL where a row is not a whole number of words. */
static struct ggml_tensor * cell_words(struct ggml_context * ctx, struct ggml_tensor * t, int32_t stream) {
    if (t->nb[1] % 4 != 0) return NULL;
    struct ggml_tensor * w = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, (int64_t) (t->nb[1] / 4), t->ne[1]);
    if (ggml_backend_tensor_alloc(t->buffer, w, (char *) t->data + (size_t) stream * t->nb[2]) != GGML_STATUS_SUCCESS) {
        return NULL;
    }
    return w;
}

/* cells[0 .. m) = cells[idx] of one cache tensor's stream (rows), in a graph on the backend. */
static void gather_rows(struct ggml_context * ctx, struct ggml_cgraph * gf, struct ggml_tensor * t, int32_t stream,
                        struct ggml_tensor * idx, int32_t * err) {
    struct ggml_tensor * w = cell_words(ctx, t, stream);
    if (w == NULL) { *err = DEV_ERR_SHAPE; return; }
    struct ggml_tensor * picked = ggml_get_rows(ctx, w, idx);
    struct ggml_tensor * dst = ggml_view_2d(ctx, w, w->ne[0], idx->ne[0], w->nb[1], 0);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, picked, dst));
}

/* The same for V stored transposed (a row of kv_size cells per dimension): each dimension's row
 * keeps the elements idx, at its start. Through float32, exact for the float types V may have. */
static void gather_cols(struct ggml_context * ctx, struct ggml_cgraph * gf, struct ggml_tensor * t, int32_t stream,
                        int64_t n_cells, struct ggml_tensor * idx, int32_t * err) {
    if (t->type != GGML_TYPE_F16 && t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_BF16) { *err = DEV_ERR_SHAPE; return; }
    const size_t el = ggml_type_size(t->type);
    const int64_t kv_size = t->ne[1], dims = t->ne[0];
    const size_t base = (size_t) stream * t->nb[2];
    struct ggml_tensor * cols = ggml_view_2d(ctx, t, n_cells, dims, kv_size * el, base);          /* [cells, dims] */
    struct ggml_tensor * rows = ggml_cont(ctx, ggml_transpose(ctx, cols));                          /* [dims, cells] */
    struct ggml_tensor * picked = ggml_get_rows(ctx, rows, idx);                                    /* [dims, m] f32 */
    struct ggml_tensor * dst = ggml_view_2d(ctx, t, idx->ne[0], dims, kv_size * el, base);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_transpose(ctx, picked), dst));
}

int32_t llamakv_device_gather(void * backend, void ** k_cache, void ** v_cache, const int32_t * v_trans, int32_t n_tensors,
                              int32_t stream, int64_t n_cells, const int32_t * kept, int64_t n_kept) {
    device_slot * s = (device_slot *) backend;
    if (s == NULL || n_kept <= 0 || n_kept > n_cells) return DEV_ERR_SHAPE;
    int32_t err = 0;
    for (int32_t l = 0; l < n_tensors && err == 0; ++l) {
        struct ggml_context * ictx = graph_context();
        struct ggml_context * ctx = graph_context();
        ggml_backend_buffer_t in_buf = NULL;
        if (ictx == NULL || ctx == NULL) { err = DEV_ERR_NO_MEMORY; goto next; }
        struct ggml_tensor * idx = ggml_new_tensor_1d(ictx, GGML_TYPE_I32, n_kept);
        in_buf = ggml_backend_alloc_ctx_tensors(ictx, s->backend);
        if (in_buf == NULL) { err = DEV_ERR_NO_MEMORY; goto next; }
        ggml_backend_tensor_set(idx, kept, 0, ggml_nbytes(idx));
        struct ggml_cgraph * gf = ggml_new_graph_custom(ctx, 64, false);
        struct ggml_tensor * k = (struct ggml_tensor *) k_cache[l];
        struct ggml_tensor * v = (struct ggml_tensor *) v_cache[l];
        if (k == NULL || v == NULL || stream >= k->ne[2] || n_cells > k->ne[1]) { err = DEV_ERR_SHAPE; goto next; }
        gather_rows(ctx, gf, k, stream, idx, &err);
        if (v_trans[l]) gather_cols(ctx, gf, v, stream, n_cells, idx, &err);
        else gather_rows(ctx, gf, v, stream, idx, &err);
        if (err) goto next;
        if (!ggml_gallocr_alloc_graph(s->galloc, gf)) { err = DEV_ERR_NO_MEMORY; goto next; }
        if (ggml_backend_graph_compute(s->backend, gf) != GGML_STATUS_SUCCESS) err = DEV_ERR_DEVICE;
    next:
        if (in_buf != NULL) ggml_backend_buffer_free(in_buf);
        if (ictx != NULL) ggml_free(ictx);
        if (ctx != NULL) ggml_free(ctx);
    }
    return err;
}
