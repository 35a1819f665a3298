/* llamakv capture shim.
 *
 * llamakv_eval_callback is installed as llama.cpp's cb_eval (ggml-backend scheduler eval callback).
 * Per layer it observes three tensors of every ubatch:
 *   - the pre-RoPE query (`Qcur-N` as RESHAPE/VIEW, or `Qcur_normed-N` for QK-norm models),
 *     merged into running statistics per (layer, head, dimension) by merge_queries;
 *   - the value (`Vcur-N` as RESHAPE/VIEW), reduced to one L2 norm per head and token;
 *   - the key after RoPE (`Kcur-N` as ROPE), stored as fp16 rows; its src[1] gives the positions
 *     and its op_params / src[2] the model's own rope parameters.
 * Queries and values usually come before the key in a layer, so they are staged until the
 * key's positions are known. Everything runs on the decoding thread; no Python is involved.
 * Answering "no" costs a few string compares; the attention width (n_kv) is read in ask mode.
 */
#define _POSIX_C_SOURCE 199309L
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>

#include "ggml.h"
#include "ggml-backend.h"
#include "llamakv_shim.h"

enum {
    ERR_NONE = 0,
    ERR_STORE_FULL = 1,
    ERR_UBATCH_TOO_LARGE = 2,
    ERR_BAD_SHAPE = 3,
    ERR_BAD_TYPE = 4,
    ERR_LAYER = 5,
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
        case ERR_STORE_FULL:       return "key store full (more cells than the context holds)";
        case ERR_UBATCH_TOO_LARGE: return "ubatch larger than the staging buffers";
        case ERR_BAD_SHAPE:        return "captured tensor has an unexpected shape";
        case ERR_BAD_TYPE:         return "captured tensor is not F32";
        case ERR_LAYER:            return "layer index out of range";
        default:                   return "unknown error";
    }
}

static void set_error(llamakv_capture * c, int32_t code) {
    if (c->error == ERR_NONE) c->error = code;
}

/* "Qcur-12" with prefix "Qcur" -> 12; -1 if the name is not prefix-N */
static int layer_of(const char * name, const char * prefix) {
    size_t n = strlen(prefix);
    if (strncmp(name, prefix, n) != 0 || name[n] != '-') return -1;
    const char * p = name + n + 1;
    if (*p < '0' || *p > '9') return -1;
    int v = 0;
    for (; *p; ++p) {
        if (*p < '0' || *p > '9') return -1;
        v = v * 10 + (*p - '0');
    }
    return v;
}

enum kind { K_NONE, K_Q, K_K, K_V };

static bool is_probe(const llamakv_capture * c, const struct ggml_tensor * t) {
    return c->probe_buf && c->probe_name[0] && t->op == (enum ggml_op) c->probe_op &&
           strcmp(t->name, c->probe_name) == 0;
}

static enum kind classify(const llamakv_capture * c, const struct ggml_tensor * t, int * layer) {
    const char * name = t->name;
    *layer = -1;
    switch (name[0]) {
        case 'Q':
            if (c->q_normed) {
                if ((*layer = layer_of(name, "Qcur_normed")) >= 0) return K_Q;
            } else if (t->op == GGML_OP_RESHAPE || t->op == GGML_OP_VIEW) {
                if ((*layer = layer_of(name, "Qcur")) >= 0) return K_Q;
            }
            break;
        case 'K':
            if (t->op == GGML_OP_ROPE && (*layer = layer_of(name, "Kcur")) >= 0) return K_K;
            break;
        case 'V':
            if ((t->op == GGML_OP_RESHAPE || t->op == GGML_OP_VIEW) &&
                (*layer = layer_of(name, "Vcur")) >= 0) return K_V;
            break;
    }
    return K_NONE;
}

/* attention width, readable without computing anything */
static void note_n_kv(llamakv_capture * c, const struct ggml_tensor * t) {
    int il;
    if (t->op == GGML_OP_FLASH_ATTN_EXT) {
        /* unnamed per layer: it follows the key of its layer, which was just observed */
        if (c->last_k_layer >= 0 && t->src[1] != NULL) c->n_kv[c->last_k_layer] = (int32_t) t->src[1]->ne[1];
        return;
    }
    if (t->op == GGML_OP_MUL_MAT && t->name[0] == 'k' && (il = layer_of(t->name, "kq")) >= 0 &&
        il < c->n_layer) {
        c->n_kv[il] = (int32_t) t->ne[0];
    }
}

/* Copy a F32 tensor of up to 4 dims into dst as a contiguous array. One device read: contiguous
 * tensors directly, views (fused QKV) through the span they cover, gathered on the host. */
static int read_f32(llamakv_capture * c, const struct ggml_tensor * t, float * dst, int64_t dst_cap) {
    if (t->type != GGML_TYPE_F32) return ERR_BAD_TYPE;
    const int64_t n = ggml_nelements(t);
    if (n > dst_cap) return ERR_UBATCH_TOO_LARGE;
    if (ggml_is_contiguous(t)) {
        ggml_backend_tensor_get(t, dst, 0, n * sizeof(float));
        return ERR_NONE;
    }
    const size_t span = ggml_nbytes(t);
    const int64_t scratch_cap = (int64_t) c->n_ubatch * (c->n_head + 2 * c->n_head_kv) * c->head_dim;
    if ((int64_t) (span / sizeof(float)) > scratch_cap) return ERR_UBATCH_TOO_LARGE;
    ggml_backend_tensor_get(t, c->scratch, 0, span);
    const char * base = (const char *) c->scratch;
    int64_t k = 0;
    for (int64_t i3 = 0; i3 < t->ne[3]; ++i3)
    for (int64_t i2 = 0; i2 < t->ne[2]; ++i2)
    for (int64_t i1 = 0; i1 < t->ne[1]; ++i1) {
        const char * row = base + i3 * t->nb[3] + i2 * t->nb[2] + i1 * t->nb[1];
        for (int64_t i0 = 0; i0 < t->ne[0]; ++i0) {
            dst[k++] = *(const float *) (row + i0 * t->nb[0]);
        }
    }
    return ERR_NONE;
}

/* Merge the staged queries of layer il whose position is >= n_sink into that layer's statistics:
 * Chan's parallel form of Welford's update. With n_a rows so far and a batch of n_b rows of mean
 * m_b and M2_b (sum of squared deviations): delta = m_b - mean, mean += delta n_b / n,
 * M2 += M2_b + delta^2 n_a n_b / n (and the same with outer products for the comoment). */
static void merge_queries(llamakv_capture * c, int il) {
    const int64_t n_tok = c->ubatch_n_tok, H = c->n_head, d = c->head_dim;
    const float * q = c->q_stage;             /* [n_tok][H][d] */
    const int32_t * pos = c->pos_stage;
    int64_t n_b = 0;
    for (int64_t t = 0; t < n_tok; ++t) n_b += pos[t] >= c->n_sink;
    if (n_b == 0) return;
    double * count = c->q_count + il;
    const double n_a = *count, n = n_a + (double) n_b, w = n_a * (double) n_b / n;
    double * mb = c->q_work, * dev = c->q_work + d;
    for (int64_t h = 0; h < H; ++h) {
        double * mean = c->q_mean + (il * H + h) * d;
        double * m2 = c->q_m2 + (il * H + h) * d;
        double * cov = c->q_cov ? c->q_cov + (il * H + h) * d * d : NULL;
        for (int64_t j = 0; j < d; ++j) mb[j] = 0.0;
        for (int64_t t = 0; t < n_tok; ++t) {
            if (pos[t] < c->n_sink) continue;
            const float * x = q + (t * H + h) * d;
            for (int64_t j = 0; j < d; ++j) mb[j] += x[j];
        }
        for (int64_t j = 0; j < d; ++j) mb[j] /= (double) n_b;
        for (int64_t t = 0; t < n_tok; ++t) {
            if (pos[t] < c->n_sink) continue;
            const float * x = q + (t * H + h) * d;
            for (int64_t j = 0; j < d; ++j) {
                dev[j] = x[j] - mb[j];
                m2[j] += dev[j] * dev[j];
            }
            if (cov) {
                for (int64_t i = 0; i < d; ++i)
                    for (int64_t j = 0; j < d; ++j) cov[i * d + j] += dev[i] * dev[j];
            }
        }
        for (int64_t j = 0; j < d; ++j) {
            dev[j] = mb[j] - mean[j];
            m2[j] += dev[j] * dev[j] * w;
            mean[j] += dev[j] * (double) n_b / n;
        }
        if (cov) {
            for (int64_t i = 0; i < d; ++i)
                for (int64_t j = 0; j < d; ++j) cov[i * d + j] += dev[i] * dev[j] * w;
        }
    }
    *count = n;
}

static void flush_query(llamakv_capture * c, int il) {
    if (c->stats_enabled) merge_queries(c, il);
    c->q_pending = -1;
}

static void flush_values(llamakv_capture * c, int il) {
    const int32_t hk = c->n_head_kv;
    for (int32_t i = 0; i < c->ubatch_n_tok; ++i) {
        float * row = c->vnorm + ((int64_t) (c->ubatch_row0 + i) * c->n_layer + il) * hk;
        memcpy(row, c->v_stage + (int64_t) i * hk, hk * sizeof(float));
    }
    c->v_pending = -1;
}

static void observe_query(llamakv_capture * c, const struct ggml_tensor * t, int il) {
    if (t->ne[0] != c->head_dim || t->ne[1] != c->n_head) { set_error(c, ERR_BAD_SHAPE); return; }
    int err = read_f32(c, t, c->q_stage, (int64_t) c->n_ubatch * c->n_head * c->head_dim);
    if (err) { set_error(c, err); return; }
    c->q_pending = il;
    /* the key of this layer may already have been seen in this ubatch (then positions are known) */
    if (c->last_k_layer == il && c->ubatch_n_tok == t->ne[2]) flush_query(c, il);
}

static void observe_value(llamakv_capture * c, const struct ggml_tensor * t, int il) {
    const int64_t d = t->ne[0], hk = t->ne[1], n_tok = t->ne[2];
    if (hk != c->n_head_kv) { set_error(c, ERR_BAD_SHAPE); return; }
    float * buf = c->kv_stage; /* values: [n_tok][hk][d] */
    int err = read_f32(c, t, buf, (int64_t) c->n_ubatch * c->n_head_kv * c->head_dim);
    if (err) { set_error(c, err); return; }
    for (int64_t i = 0; i < n_tok * hk; ++i) {
        const float * v = buf + i * d;
        double s = 0.0;
        for (int64_t j = 0; j < d; ++j) s += (double) v[j] * v[j];
        c->v_stage[i] = (float) sqrt(s);
    }
    c->v_pending = il;
    if (c->last_k_layer == il && c->ubatch_n_tok == n_tok) flush_values(c, il);
}

static void observe_key(llamakv_capture * c, const struct ggml_tensor * t, int il) {
    const int64_t d = t->ne[0], hk = t->ne[1], n_tok = t->ne[2];
    if (d != c->head_dim || hk != c->n_head_kv) { set_error(c, ERR_BAD_SHAPE); return; }
    if (n_tok > c->n_ubatch) { set_error(c, ERR_UBATCH_TOO_LARGE); return; }

    if (il <= c->last_k_layer || c->last_k_layer < 0) {
        /* first layer of a new ubatch: positions and key-store rows */
        const struct ggml_tensor * pos = t->src[1];
        if (pos == NULL || pos->type != GGML_TYPE_I32 || pos->ne[0] < n_tok) { set_error(c, ERR_BAD_SHAPE); return; }
        ggml_backend_tensor_get(pos, c->pos_stage, 0, n_tok * sizeof(int32_t));
        if (c->n_rows + n_tok > c->capacity) { set_error(c, ERR_STORE_FULL); return; }
        c->ubatch_row0 = c->n_rows;
        c->ubatch_n_tok = (int32_t) n_tok;
        c->n_rows += (int32_t) n_tok;
        memcpy(c->pos + c->ubatch_row0, c->pos_stage, n_tok * sizeof(int32_t));
    } else if (n_tok != c->ubatch_n_tok) {
        set_error(c, ERR_BAD_SHAPE);
        return;
    }
    c->last_k_layer = il;

    if (!c->rope_seen[il]) {
        memcpy(c->rope_params + il * 16, t->op_params, 16 * sizeof(int32_t));
        const struct ggml_tensor * ff = t->src[2];
        if (ff != NULL && ff->type == GGML_TYPE_F32 && ff->ne[0] >= c->head_dim / 2) {
            ggml_backend_tensor_get(ff, c->rope_factors + (int64_t) il * (c->head_dim / 2), 0,
                                    (c->head_dim / 2) * sizeof(float));
            c->rope_has_factors[il] = 1;
        }
        c->rope_seen[il] = 1;
    }

    float * buf = c->kv_stage;
    int err = read_f32(c, t, buf, (int64_t) c->n_ubatch * c->n_head_kv * c->head_dim);
    if (err) { set_error(c, err); return; }
    const int64_t per_tok = hk * d;
    for (int64_t i = 0; i < n_tok; ++i) {
        uint16_t * row = c->keys + ((int64_t) (c->ubatch_row0 + i) * c->n_layer + il) * per_tok;
        ggml_fp32_to_fp16_row(buf + i * per_tok, (ggml_fp16_t *) row, per_tok);
    }
    if (c->q_pending == il) flush_query(c, il);
    if (c->v_pending == il) flush_values(c, il);
}

static void observe_probe(llamakv_capture * c, const struct ggml_tensor * t) {
    int err = read_f32(c, t, c->probe_buf, c->probe_cap);
    if (err) { set_error(c, err); return; }
    c->probe_n = ggml_nelements(t);
    for (int i = 0; i < 4; ++i) c->probe_ne[i] = t->ne[i];
}

bool llamakv_eval_callback(struct ggml_tensor * t, bool ask, void * user_data) {
    llamakv_capture * c = (llamakv_capture *) user_data;
    if (c == NULL || !c->enabled) return ask ? false : true;
    int il;
    enum kind k = classify(c, t, &il);
    const bool probe = is_probe(c, t);
    if (ask) {
        if (k == K_NONE) note_n_kv(c, t);
        return k != K_NONE || probe;
    }
    if (probe) observe_probe(c, t);
    if (k == K_NONE) return true;
    if (il < 0 || il >= c->n_layer) { set_error(c, ERR_LAYER); return true; }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    switch (k) {
        case K_Q: observe_query(c, t, il); break;
        case K_K: observe_key(c, t, il);   break;
        case K_V: observe_value(c, t, il); break;
        default: break;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    c->capture_ns += (int64_t) (t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec);
    c->n_observed++;
    return true; /* false would only abandon the rest of the split */
}
