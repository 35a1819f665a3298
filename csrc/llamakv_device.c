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
enum { MAX_DEVICES = 16, CHUNK_CELLS = 16384 };

typedef struct {
    ggml_backend_dev_t dev;
    ggml_backend_t backend;
    ggml_gallocr_t galloc;   /* intermediates, reused from one compression to the next */
} device_slot;

static device_slot slots[MAX_DEVICES];
static int n_slots;
static pthread_mutex_t slots_lock = PTHREAD_MUTEX_INITIALIZER;

static struct ggml_context * sized_context(size_t n_nodes) {
    struct ggml_init_params p = {
        /*.mem_size   =*/ ggml_tensor_overhead() * n_nodes * 2 + ggml_graph_overhead_custom(n_nodes, false),
        /*.mem_buffer =*/ NULL,
        /*.no_alloc   =*/ true,
    };
    return ggml_init(p);
}


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
        if (backend != NULL) {
            set_threads(dev, backend, n_threads);
            s = &slots[n_slots++];
            s->dev = dev;
            s->backend = backend;
            s->galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend));
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

size_t llamakv_device_scratch_bytes(void * slot) {
    return slot != NULL ? ggml_gallocr_get_buffer_size(((device_slot *) slot)->galloc, 0) : 0;
}

const char * llamakv_device_name(void * slot) {
    return slot != NULL ? ggml_backend_dev_name(((device_slot *) slot)->dev) : "";
}

int32_t llamakv_rpc_add_server(const char * endpoint) {
    ggml_backend_reg_t rpc = ggml_backend_reg_by_name("RPC");
    typedef ggml_backend_reg_t (*add_fn)(const char *);
    add_fn add = rpc != NULL ? (add_fn) ggml_backend_reg_get_proc_address(rpc, "ggml_backend_rpc_add_server") : NULL;
    if (add == NULL) return -1;
    ggml_backend_reg_t reg = add(endpoint);
    if (reg == NULL) return -2;
    ggml_backend_register(reg);
    return (int32_t) ggml_backend_reg_dev_count(reg);
}

/* The inputs of one layer's graph, allocated in their own buffer and filled from the host. */
typedef struct {
    struct ggml_tensor * idx, * anchor_idx, * mask, * scored01, * w_lin, * w_sq, * w_cross, * sinks;
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

/* Float keys [d, n, n_head_kv] of the cells idx [n, n_head_kv] (each head's column the same cells)
 * of a cache tensor's stream: get_rows over the tensor seen as [d, cells, heads] (a strided view)
 * converts, dequantizes and lays the heads out as the products want, in one pass. */
static struct ggml_tensor * keys_of(struct ggml_context * ctx, struct ggml_tensor * k, int32_t stream,
                                    struct ggml_tensor * idx, int64_t d, int64_t hkv) {
    struct ggml_tensor * heads = ggml_view_3d(ctx, k, d, k->ne[1], hkv, k->nb[1], ggml_row_size(k->type, d),
                                              (size_t) stream * k->nb[2]);
    return ggml_get_rows(ctx, heads, idx);
}

/* Value norms [1, n, n_head_kv] of cells c0 .. c0 + n - 1 (rows) or of the same cells of a
 * transposed V (a row of kv_size cells per dimension). */
static struct ggml_tensor * value_norms(struct ggml_context * ctx, struct ggml_tensor * v, int32_t v_trans, int32_t stream,
                                        struct ggml_tensor * idx, int64_t c0, int64_t n, int64_t dv, int64_t hkv) {
    if (!v_trans) {
        struct ggml_tensor * vf = keys_of(ctx, v, stream, idx, dv, hkv);  /* [dv, n, hkv] */
        return ggml_sqrt(ctx, ggml_sum_rows(ctx, ggml_sqr(ctx, vf)));      /* [1, n, hkv] */
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

/* One layer's scores in graph gf: [1, n, hkv] (the layer's KV heads' scores, memory [hkv][n]) and,
 * with an anchor sample, KeyDiff's summed cosines [1, n] (*kd, without the sign). */
static struct ggml_tensor * layer_scores(struct ggml_context * ctx, struct ggml_tensor * k, struct ggml_tensor * v,
                                         int32_t v_trans, int32_t stream, int64_t n, int32_t n_head, int32_t hkv,
                                         int32_t d, const layer_inputs * in, float cap, int32_t n_pairs,
                                         int32_t pair_kind, int32_t use_vnorm, float epsilon, struct ggml_tensor ** kd) {
    const int32_t group = n_head / hkv;
    const int64_t dv = use_vnorm ? v->ne[0] / hkv : 0;
    struct ggml_tensor * anchor = NULL;
    if (in->anchor_idx != NULL) {
        /* the normalised mean of the normalised sampled keys, per KV head: [d, 1, hkv] */
        struct ggml_tensor * ks = ggml_l2_norm(ctx, keys_of(ctx, k, stream, in->anchor_idx, d, hkv), 1e-6f);
        struct ggml_tensor * m = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, ks, 1, 0, 2, 3)));  /* [1, d, hkv] */
        anchor = ggml_l2_norm(ctx, ggml_reshape_3d(ctx, m, d, 1, hkv), 1e-30f);
    }
    struct ggml_tensor * z = NULL, * vn = NULL;
    *kd = NULL;
    for (int64_t c0 = 0; c0 < n; c0 += CHUNK_CELLS) {
        const int64_t nc = n - c0 < CHUNK_CELLS ? n - c0 : CHUNK_CELLS;
        struct ggml_tensor * idx_c = ggml_view_2d(ctx, in->idx, nc, hkv, in->idx->nb[1], (size_t) c0 * sizeof(int32_t));
        struct ggml_tensor * kp = keys_of(ctx, k, stream, idx_c, d, hkv);
        struct ggml_tensor * cos_sum = NULL;
        z = concat_or(ctx, z, chunk_logits(ctx, kp, in, n_pairs, pair_kind, anchor, &cos_sum), 0);
        if (cos_sum != NULL) *kd = concat_or(ctx, *kd, cos_sum, 1);
        if (use_vnorm) vn = concat_or(ctx, vn, value_norms(ctx, v, v_trans, stream, idx_c, c0, nc, dv, hkv), 1);
    }
    if (cap > 0.0f) z = ggml_scale(ctx, ggml_tanh(ctx, ggml_scale(ctx, z, 1.0f / cap)), cap);
    z = ggml_reshape_3d(ctx, ggml_add(ctx, z, in->mask), n, 1, n_head);  /* row h = g * group + j */
    struct ggml_tensor * p = ggml_soft_max(ctx, z);
    if (in->sinks != NULL) ggml_soft_max_add_sinks(p, in->sinks);
    p = ggml_reshape_3d(ctx, p, n, group, hkv);
    struct ggml_tensor * gm = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, p, 1, 0, 2, 3)));  /* [1, n, hkv] */
    if (*kd != NULL) *kd = ggml_scale(ctx, *kd, -1.0f);
    if (!use_vnorm) return ggml_scale(ctx, gm, 1.0f / group);
    /* (mean + epsilon) * |v|, 0 where not scored (the host marks those +inf) */
    return ggml_mul(ctx, ggml_mul(ctx, ggml_scale_bias(ctx, gm, 1.0f / group, epsilon), vn), in->scored01);
}

static size_t graph_nodes(int32_t n_layer, int64_t n) {
    const int64_t chunks = (n + CHUNK_CELLS - 1) / CHUNK_CELLS;
    return (size_t) (256 + n_layer * (64 + chunks * 64));
}

int32_t llamakv_device_ea_scores(void * backend, void ** k_cache, void ** v_cache, const int32_t * v_trans,
                                 int32_t n_layer, int32_t stream, int64_t n_cells, int32_t n_head, int32_t n_head_kv,
                                 int32_t head_dim, const float * w, int32_t n_pairs, int32_t pair_kind,
                                 const float * caps, const float * sinks, const uint8_t * scored, int32_t use_vnorm,
                                 float epsilon, const int32_t * anchor_cells, int64_t n_anchor, float * out,
                                 float * mean_share, float * keydiff_sums) {
    device_slot * s = (device_slot *) backend;
    const int32_t d = head_dim, hkv = n_head_kv;
    if (s == NULL || hkv <= 0 || n_head % hkv != 0 || n_cells <= 0 || n_layer <= 0) return DEV_ERR_SHAPE;
    if (n_pairs == 0) pair_kind = 0;
    if ((pair_kind == 2 && d % 2 != 0) || 2 * n_pairs > d) return DEV_ERR_SHAPE;
    for (int32_t l = 0; l < n_layer; ++l) {
        const struct ggml_tensor * k = (const struct ggml_tensor *) k_cache[l];
        const struct ggml_tensor * v = (const struct ggml_tensor *) v_cache[l];
        if (k == NULL || k->ne[0] != (int64_t) d * hkv || n_cells > k->ne[1] || stream >= k->ne[2] ||
            (use_vnorm && (v == NULL || v->ne[0] != (int64_t) d * hkv))) {
            return DEV_ERR_SHAPE;
        }
    }
    const int32_t group = n_head / hkv;
    const int64_t n = n_cells, wrow = 2 * (int64_t) d + n_pairs;
    const size_t n_nodes = graph_nodes(n_layer, n);
    struct ggml_context * ictx = sized_context((size_t) 16 + 8 * n_layer);
    struct ggml_context * ctx = sized_context(n_nodes);
    ggml_backend_buffer_t in_buf = NULL;
    int32_t err = 0;
    float * host = NULL;
    if (ictx == NULL || ctx == NULL) { err = DEV_ERR_NO_MEMORY; goto done; }
    /* the inputs of every layer in one buffer: the cells, their mask, the anchor sample and per
     * layer the weights [d, group, hkv] of k, k*k and the pairs' products, and the sinks */
    struct ggml_tensor * idx = ggml_new_tensor_2d(ictx, GGML_TYPE_I32, n, hkv);  /* the cells, per KV head */
    struct ggml_tensor * mask = ggml_new_tensor_3d(ictx, GGML_TYPE_F32, n, 1, 1);
    struct ggml_tensor * scored01 = ggml_new_tensor_3d(ictx, GGML_TYPE_F32, 1, n, 1);
    struct ggml_tensor * anchor_idx = n_anchor > 0 ? ggml_new_tensor_2d(ictx, GGML_TYPE_I32, n_anchor, hkv) : NULL;
    struct ggml_tensor * w_lin = ggml_new_tensor_4d(ictx, GGML_TYPE_F32, d, group, hkv, n_layer);
    struct ggml_tensor * w_sq = ggml_new_tensor_4d(ictx, GGML_TYPE_F32, d, group, hkv, n_layer);
    struct ggml_tensor * w_cross = n_pairs > 0 ? ggml_new_tensor_4d(ictx, GGML_TYPE_F32, n_pairs, group, hkv, n_layer) : NULL;
    struct ggml_tensor * sink_t = sinks != NULL ? ggml_new_tensor_2d(ictx, GGML_TYPE_F32, n_head, n_layer) : NULL;
    in_buf = ggml_backend_alloc_ctx_tensors(ictx, s->backend);
    const size_t per_layer = (size_t) n_head * d;
    host = malloc(sizeof(float) * (size_t) ((2 + hkv) * n + hkv * (n_anchor > 0 ? n_anchor : 0) +
                                            2 * per_layer * n_layer + (size_t) n_head * (n_pairs + 1) * n_layer));
    if (in_buf == NULL || host == NULL) { err = DEV_ERR_NO_MEMORY; goto done; }
    {
        float * hmask = host, * h01 = host + n;
        int32_t * hidx = (int32_t *) (host + 2 * n);
        int32_t * hanchor = hidx + (int64_t) hkv * n;
        for (int64_t i = 0; i < n; ++i) {
            hmask[i] = scored[i] ? 0.0f : -INFINITY;
            h01[i] = scored[i] ? 1.0f : 0.0f;
            for (int32_t g = 0; g < hkv; ++g) hidx[(int64_t) g * n + i] = (int32_t) i;
        }
        for (int64_t i = 0; i < n_anchor; ++i) {
            for (int32_t g = 0; g < hkv; ++g) hanchor[(int64_t) g * n_anchor + i] = anchor_cells[i];
        }
        ggml_backend_tensor_set(idx, hidx, 0, ggml_nbytes(idx));
        ggml_backend_tensor_set(mask, hmask, 0, ggml_nbytes(mask));
        ggml_backend_tensor_set(scored01, h01, 0, ggml_nbytes(scored01));
        float * wl = (float *) (hanchor + (int64_t) hkv * n_anchor), * wq = wl + per_layer * n_layer;
        float * wc = wq + per_layer * n_layer;
        for (int64_t r = 0; r < (int64_t) n_layer * n_head; ++r) {  /* rows of (layer, head) */
            memcpy(wl + r * d, w + r * wrow, d * sizeof(float));
            memcpy(wq + r * d, w + r * wrow + d, d * sizeof(float));
            if (n_pairs > 0) memcpy(wc + r * n_pairs, w + r * wrow + 2 * d, n_pairs * sizeof(float));
        }
        ggml_backend_tensor_set(w_lin, wl, 0, ggml_nbytes(w_lin));
        ggml_backend_tensor_set(w_sq, wq, 0, ggml_nbytes(w_sq));
        if (w_cross != NULL) ggml_backend_tensor_set(w_cross, wc, 0, ggml_nbytes(w_cross));
        if (anchor_idx != NULL) ggml_backend_tensor_set(anchor_idx, hanchor, 0, ggml_nbytes(anchor_idx));
        if (sink_t != NULL) ggml_backend_tensor_set(sink_t, sinks, 0, ggml_nbytes(sink_t));
    }
    struct ggml_cgraph * gf = ggml_new_graph_custom(ctx, n_nodes, false);
    struct ggml_tensor ** scores = calloc((size_t) n_layer * 2, sizeof(struct ggml_tensor *));
    if (scores == NULL) { err = DEV_ERR_NO_MEMORY; goto done; }
    struct ggml_tensor * mean_acc = NULL;  /* [1, n]: each (layer, head) row's shares, summed */
    for (int32_t l = 0; l < n_layer; ++l) {
        layer_inputs in = {0};
        in.idx = idx;
        in.mask = mask;
        in.scored01 = scored01;
        in.anchor_idx = anchor_idx;
        in.w_lin = ggml_view_3d(ctx, w_lin, d, group, hkv, w_lin->nb[1], w_lin->nb[2], (size_t) l * w_lin->nb[3]);
        in.w_sq = ggml_view_3d(ctx, w_sq, d, group, hkv, w_sq->nb[1], w_sq->nb[2], (size_t) l * w_sq->nb[3]);
        in.w_cross = w_cross == NULL ? NULL
            : ggml_view_3d(ctx, w_cross, n_pairs, group, hkv, w_cross->nb[1], w_cross->nb[2], (size_t) l * w_cross->nb[3]);
        in.sinks = sink_t != NULL && !isnan(sinks[(int64_t) l * n_head])
            ? ggml_view_1d(ctx, sink_t, n_head, (size_t) l * sink_t->nb[1]) : NULL;
        struct ggml_tensor * kd = NULL;
        struct ggml_tensor * sc = layer_scores(ctx, (struct ggml_tensor *) k_cache[l], (struct ggml_tensor *) v_cache[l],
                                               use_vnorm ? v_trans[l] : 0, stream, n, n_head, hkv, d, &in,
                                               caps != NULL ? caps[l] : 0.0f, n_pairs, pair_kind, use_vnorm, epsilon, &kd);
        if (out != NULL) {
            ggml_set_output(sc);
            ggml_build_forward_expand(gf, sc);
            scores[2 * l] = sc;
        }
        if (mean_share != NULL) {
            /* aggregate()'s "mean": each head's row over its sum (1e-30 at least), summed */
            struct ggml_tensor * rows = ggml_reshape_2d(ctx, sc, n, hkv);
            struct ggml_tensor * sums = ggml_clamp(ctx, ggml_sum_rows(ctx, rows), 1e-30f, INFINITY);  /* [1, hkv] */
            struct ggml_tensor * shares = ggml_div(ctx, rows, sums);
            struct ggml_tensor * per_cell = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_transpose(ctx, shares)));  /* [1, n] */
            mean_acc = mean_acc == NULL ? per_cell : ggml_add(ctx, mean_acc, per_cell);
            /* every node of this layer enters the graph before the next layer's: the allocator then
             * frees the layer's float copies of the keys before the next layer takes its own */
            ggml_build_forward_expand(gf, mean_acc);
        }
        if (kd != NULL && keydiff_sums != NULL) {
            ggml_set_output(kd);
            ggml_build_forward_expand(gf, kd);
            scores[2 * l + 1] = kd;
        }
    }
    if (mean_acc != NULL) {
        mean_acc = ggml_scale(ctx, mean_acc, 1.0f / ((float) n_layer * hkv));
        ggml_set_output(mean_acc);
        ggml_build_forward_expand(gf, mean_acc);
    }
    if (!ggml_gallocr_alloc_graph(s->galloc, gf)) { err = DEV_ERR_NO_MEMORY; }
    else if (ggml_backend_graph_compute(s->backend, gf) != GGML_STATUS_SUCCESS) { err = DEV_ERR_DEVICE; }
    for (int32_t l = 0; l < n_layer && err == 0; ++l) {
        if (scores[2 * l + 1] != NULL) {
            ggml_backend_tensor_get(scores[2 * l + 1], keydiff_sums + (int64_t) l * n, 0, (size_t) n * sizeof(float));
        }
        if (out == NULL) continue;
        float * o = out + (int64_t) l * hkv * n;
        ggml_backend_tensor_get(scores[2 * l], o, 0, (size_t) n * hkv * sizeof(float));  /* [hkv][n] */
        for (int32_t g = 0; g < hkv; ++g) {
            for (int64_t i = 0; i < n; ++i) {
                if (!scored[i]) o[(int64_t) g * n + i] = INFINITY;
            }
        }
    }
    if (err == 0 && mean_acc != NULL) {
        ggml_backend_tensor_get(mean_acc, mean_share, 0, (size_t) n * sizeof(float));
        for (int64_t i = 0; i < n; ++i) {
            if (!scored[i]) mean_share[i] = INFINITY;
        }
    }
    free(scores);
done:
    free(host);
    if (in_buf != NULL) ggml_backend_buffer_free(in_buf);
    if (ictx != NULL) ggml_free(ictx);
    if (ctx != NULL) ggml_free(ctx);
    return err;
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
    for (int32_t l = 0; l < n_tensors; ++l) {
        const struct ggml_tensor * k = (const struct ggml_tensor *) k_cache[l];
        if (k == NULL || v_cache[l] == NULL || stream >= k->ne[2] || n_cells > k->ne[1]) return DEV_ERR_SHAPE;
    }
    const size_t n_nodes = (size_t) 64 + 16 * n_tensors;
    struct ggml_context * ictx = sized_context(4);
    struct ggml_context * ctx = sized_context(n_nodes);
    ggml_backend_buffer_t in_buf = NULL;
    int32_t err = 0;
    if (ictx == NULL || ctx == NULL) { err = DEV_ERR_NO_MEMORY; goto done; }
    struct ggml_tensor * idx = ggml_new_tensor_1d(ictx, GGML_TYPE_I32, n_kept);
    in_buf = ggml_backend_alloc_ctx_tensors(ictx, s->backend);
    if (in_buf == NULL) { err = DEV_ERR_NO_MEMORY; goto done; }
    ggml_backend_tensor_set(idx, kept, 0, ggml_nbytes(idx));
    struct ggml_cgraph * gf = ggml_new_graph_custom(ctx, n_nodes, false);
    for (int32_t l = 0; l < n_tensors && err == 0; ++l) {
        gather_rows(ctx, gf, (struct ggml_tensor *) k_cache[l], stream, idx, &err);
        if (v_trans[l]) gather_cols(ctx, gf, (struct ggml_tensor *) v_cache[l], stream, n_cells, idx, &err);
        else gather_rows(ctx, gf, (struct ggml_tensor *) v_cache[l], stream, idx, &err);
    }
    if (err == 0 && !ggml_gallocr_alloc_graph(s->galloc, gf)) err = DEV_ERR_NO_MEMORY;
    if (err == 0 && ggml_backend_graph_compute(s->backend, gf) != GGML_STATUS_SUCCESS) err = DEV_ERR_DEVICE;
done:
    if (in_buf != NULL) ggml_backend_buffer_free(in_buf);
    if (ictx != NULL) ggml_free(ictx);
    if (ctx != NULL) ggml_free(ctx);
    return err;
}
