/* llamakv shim: the state shared between the C eval callback and Python (cffi), and the kernels
 * Python calls on the cache state. Only plain C types here: cffi parses this file (preprocessor
 * lines and comments are stripped). */

/* Where the queries of one sequence go: its running statistics and its ring of recent queries.
 * One per sequence of the context, owned by Python. */
typedef struct llamakv_seq_capture {
    /* query statistics, per layer (Welford / Chan: count, mean, M2; optional comoment) */
    double * q_count;          /* [n_layer] */
    double * q_mean;           /* [n_layer][n_head][head_dim] */
    double * q_m2;             /* [n_layer][n_head][head_dim] */
    double * q_cov;            /* [n_layer][n_head][head_dim][head_dim] or NULL */
    /* ring of the most recent pre-RoPE queries (attention-based presses) */
    float * window;            /* [n_layer][window_cap][n_head][head_dim] */
    int32_t window_cap;
    int32_t window_head;       /* ring slot of the segment's first window row (Python advances it) */
    int64_t capture_ns;        /* time spent copying and merging this sequence's queries */
} llamakv_seq_capture;

/* Rows row0 .. row0 + n_tok - 1 of the ubatch: tokens of one sequence at consecutive positions
 * pos0 ..; the last stats_rows feed its statistics, the last window_rows its window ring.
 * llamakv builds every batch as llama.cpp will decode it (one ubatch; with several sequences,
 * as llama.cpp's split_equal orders them: sequence after sequence), so rows are known by index. */
typedef struct llamakv_segment {
    llamakv_seq_capture * seq;
    int32_t row0, n_tok, pos0;
    int32_t stats_rows, window_rows;
} llamakv_segment;

typedef struct llamakv_capture {
    /* configuration, written by Python */
    int32_t n_layer, n_head, head_dim;
    int32_t n_ubatch;          /* largest ubatch: sizes the staging buffer */
    int32_t n_sink;            /* positions below this are left out of the statistics */
    int32_t enabled;           /* 0: the callback observes nothing (and splits no graph) */
    int32_t stats_enabled;     /* 0: queries are not accumulated */

    /* the ubatch being decoded, written by Python before each llama_decode */
    int32_t ubatch_n_tok;
    int32_t n_seg;             /* segments of the ubatch with queries wanted */
    int32_t seg_cap;
    llamakv_segment * segs;    /* [seg_cap] */

    /* the attention layout, learnt from the graph's structure while `learn` is set (the callback
     * then only looks): each attention node's query is followed back through views, permutes,
     * scales and the Hadamard rotation of a quantized cache to its ROPE node, whose input is the
     * pre-RoPE query; a layer without rope has its query read where that walk ends */
    int32_t learn;
    int32_t n_attn;            /* attention nodes seen in the current graph */
    int32_t layout_error;      /* first problem met while learning, 0 if none (see the .c file) */
    char * q_names;            /* [n_layer][64]: name of the pre-RoPE query node */
    int32_t * q_ops;           /* [n_layer]: its op, -1 where no attention node was found */
    int32_t * q_shape;         /* [n_layer][2]: its ne0, ne1 (head_dim, n_head) */
    char * rope_names;         /* [n_layer][64]: name of the query's ROPE node, "" without rope */
    float * logit;             /* [n_layer][3]: scale, softcap, max_bias: the logit of a rotated
                                  query q and a cached key k is softcap tanh(scale q.k / softcap)
                                  (scale q.k when softcap is 0), plus ALiBi's bias */
    float * sinks;             /* [n_layer][n_head]: learned sink logits (GPT-OSS) */
    int32_t * has_sinks;       /* [n_layer] */
    int32_t * k_rot;           /* [n_layer]: size of the Hadamard blocks rotating q and k, 0: none */
    int32_t * attn_layer;      /* [n_layer]: layer of the k-th attention node of a graph */
    int32_t * layer_on;        /* [n_layer]: 1 where the layer's queries are captured (set by Python) */
    void ** seen;              /* [seen_cap]: ring of the nodes asked about while learning; a node's
                                  input on another backend is a copy the walk follows back by it */
    int32_t seen_cap, seen_head;
    char layout_detail[128];   /* where the walk of the first layout problem stopped */
    int32_t * rope_params;     /* [n_layer][16]: the query's ROPE node's op_params */
    float * rope_factors;      /* [n_layer][head_dim/2]: the ROPE node's frequency factors */
    int32_t * rope_has_factors;/* [n_layer] */
    int32_t * rope_seen;       /* [n_layer] */
    int32_t * n_kv;            /* [n_layer]: width of the last attention (cells attended) */
    void ** k_cache;           /* [n_layer]: the K cache tensor the layer's attention reads (learnt;
                                  NULL where it reads a copy: a cache on another backend) */
    void ** v_cache;           /* [n_layer]: the V cache tensor, likewise */
    int32_t * v_trans;         /* [n_layer]: 1 where V is stored transposed (a row per dimension) */
    void ** attn_node;         /* [n_layer]: while learning, each layer's attention node */

    /* optional probe: copy the F32 tensor with this name and op (tests, debugging) */
    char probe_name[64];
    int32_t probe_op;
    float * probe_buf;
    int64_t probe_cap;         /* floats */
    int64_t probe_n;           /* floats written by the last match */
    int64_t probe_ne[4];

    /* staging (allocated by Python) */
    float * q_stage;           /* [n_ubatch][n_head][head_dim] */
    float * scratch;           /* [n_ubatch * 3 * n_head * head_dim]: strided reads of fused QKV */
    double * q_work;           /* [3 * n_head * head_dim] */

    int64_t n_observed;        /* tensors copied so far */
    int64_t capture_ns;        /* time spent copying and accumulating */
    int64_t copy_ns;           /* of which copying from the device */
    int32_t error;             /* first error, 0 if none; see llamakv_error_string */
} llamakv_capture;

bool llamakv_eval_callback(void * tensor, bool ask, void * user_data);
const char * llamakv_error_string(int32_t code);
int32_t llamakv_op_code(const char * name);

/* Rows of a cache tensor (one per cell, `row_bytes` each, ggml type `type`) to float32. */
int32_t llamakv_rows_to_float(const uint8_t * rows, int32_t type, int64_t row_bytes, int64_t n_rows,
                              int64_t n_per_row, float * out);

/* Expected-attention logits of one layer: for query head h and cell i, with k the cell's key of
 * head h's group as float, permuted by perm so that the rotated pairs come first (k[p], k[P + p]),
 * z[h][i] = m[h] . [k, k*k, (k[p] k[P+p])_p]: m [n_head][2 head_dim + n_pairs]. Unless keydiff is
 * NULL, also KeyDiff's scores from the same read of the keys: keydiff[g][i] = minus the cosine
 * between the (permuted) key head g and anchor[g] (permuted the same way), anchor [n_head_kv][head_dim]. */
int32_t llamakv_ea_logits(const uint8_t * rows, int32_t type, int64_t row_bytes, int64_t n_cells,
                          int32_t n_head, int32_t n_head_kv, int32_t head_dim,
                          const float * m, const int32_t * perm, int32_t n_pairs, const float * anchor,
                          float * keydiff, float * z);

/* Expected Attention's scores of one layer from its logits z [n_head][n_cells] (overwritten): per
 * query head the softmax over the cells with scored[i] != 0 (and the head's learned sink logit
 * sinks[h] in the denominator, unless sinks is NULL), the mean over each GQA group, plus epsilon,
 * times the value norm vnorm[i * vnorm_stride + g] (skipped if vnorm is NULL); cells not scored
 * get +inf. out [n_head_kv][n_cells]. */
int32_t llamakv_ea_attention(float * z, int64_t n_cells, int32_t n_head, int32_t n_head_kv, const uint8_t * scored,
                             const float * sinks, const float * vnorm, int64_t vnorm_stride, float epsilon,
                             float * out);

/* KeyDiff's anchor of one layer: per KV head, the normalised mean of the normalised key heads of the
 * cells i = stride / 2 + j * stride with scored[i] != 0 (all of them, if none is; every cell, if
 * that sample has none). anchor [n_head_kv][head_dim]. */
int32_t llamakv_key_anchor(const uint8_t * rows, int32_t type, int64_t row_bytes, int64_t n_cells,
                           int32_t n_head_kv, int32_t head_dim, const uint8_t * scored, int64_t stride,
                           float * anchor);

/* KeyDiff's scores of one layer: minus the cosine between each key head and its anchor
 * [n_head_kv][head_dim]. out [n_head_kv][n_cells]. */
int32_t llamakv_keydiff_scores(const uint8_t * rows, int32_t type, int64_t row_bytes, int64_t n_cells,
                               int32_t n_head_kv, int32_t head_dim, const float * anchor, float * out);

/* Attention of n_q queries to the cells of one layer, averaged over the queries: for each query head,
 * the softmax of q.k over the cells with scored[i] != 0 and cell_pos[i] <= qpos[w] (the query's
 * own position), the mean over the n_q queries. q after RoPE, scaled by the attention scale,
 * [n_head_kv][group][n_q][head_dim] (each KV head's query rows together). out [n_head][n_cells];
 * 0 where no query sees the cell. head_dim a multiple of 8 and of the type's block size. */
int32_t llamakv_window_attention(const uint8_t * rows, int32_t type, int64_t row_bytes, int64_t n_cells,
                                 int32_t n_head, int32_t n_head_kv, int32_t head_dim, const float * q, int32_t n_q,
                                 const int64_t * qpos, const int64_t * cell_pos, const uint8_t * scored,
                                 float * out);

/* L2 norm of each value head of each cell: out [n_cells][n_head_kv]. V as rows (one per cell)
 * or transposed (one row of n_cells elements per dimension, `row_bytes` apart). */
int32_t llamakv_value_norms(const uint8_t * data, int32_t type, int64_t row_bytes, int64_t n_cells,
                            int32_t n_head_kv, int32_t head_dim, int32_t transposed, float * out);

/* Surprisal of tokens from the logits that predicted them: out[i] = logsumexp(logits[i]) -
 * logits[i][next_tokens[i]] (nats), for n_rows rows of n_vocab floats. */
void llamakv_surprisal(const float * logits, int64_t n_rows, int64_t n_vocab, const int32_t * next_tokens,
                       float * out);

/* dst[i] = src[idx[i]] for rows of row_bytes bytes. */
void llamakv_gather_rows(const uint8_t * src, uint8_t * dst, int64_t row_bytes, const int64_t * idx, int64_t n);

/* Columns idx of a [n_rows][n_cols] matrix of elem-byte elements into [n_rows][n_idx]. */
void llamakv_gather_cols(const uint8_t * src, uint8_t * dst, int64_t n_rows, int64_t n_cols, int64_t elem,
                         const int64_t * idx, int64_t n_idx);

/* Switching the callback between decode calls (see the .c file). */
int64_t llamakv_find_callback_slot(const void * ctx, const void * cb, const void * ud);
void llamakv_switch_callback(void * ctx, int64_t slot, void * get_sched, void * cb, void * ud);

/* Pinned host memory of the first GPU, NULL if there is none. */
void * llamakv_pinned_alloc(size_t size, void ** handle);
void llamakv_pinned_free(void * handle);

/* ---- scoring on the cache's own device (llamakv_device.c) ----
 * The K and V cache tensors of each layer (llama.cpp's cache_k_l<il>, cache_v_l<il>, shaped
 * [n_embd, kv_size, n_stream]) are found while learning the layout (llamakv_capture.k_cache /
 * v_cache). Expected Attention's scores are then computed from them with a ggml graph on the
 * backend that holds them, so that only scores cross to the host. The cells scored are cells
 * 0 .. n_cells - 1 of `stream`, in cell order (llamakv keeps a sequence's cells there). */

/* A backend for the device holding tensor `t` (a ggml_tensor *), started once per device; NULL
 * where its buffer is not the device's own (e.g. host memory of a GPU). */
void * llamakv_device_backend(void * t, int32_t n_threads);
const char * llamakv_device_name(void * backend);
int32_t llamakv_device_is_gpu(void * backend);  /* 0: the CPU backend */
size_t llamakv_device_scratch_bytes(void * backend);  /* device memory of the graphs' intermediates */

/* Registers the llama.cpp RPC server at `endpoint` ("host:port") as ggml devices, so that models
 * loaded afterwards offload layers to it (llama.cpp puts RPC devices first). Returns the number of
 * devices it serves, -1 where this ggml has no RPC backend, -2 where the server did not answer. */
int32_t llamakv_rpc_add_server(const char * endpoint);

/* Expected Attention (and, with n_anchor > 0, KeyDiff) of n_layer layers, on the device (the
 * `backend` of llamakv_device_backend), from the layers' cache tensors k_cache/v_cache (v_trans: V
 * stored transposed):
 *   w [n_layer][n_head][2 head_dim + n_pairs]: per query head the weights of k, k*k (dimensions in
 *     their stored order) and of the products of each rotated pair, pairs laid out as pair_kind
 *     says (1: dims p and n_pairs + p, NEOX; 2: dims 2p and 2p + 1, normal; 0: no pairs);
 *   caps [n_layer]: logit soft cap, 0 for none; sinks [n_layer][n_head] or NULL (NaN rows: none);
 *   scored [n_cells]: cells in the softmax (0: a sink, +inf in out);
 *   anchor_cells [n_anchor]: the cells KeyDiff's anchor is the normalised mean of.
 * out [n_layer][n_head_kv][n_cells] as llamakv_ea_attention (unless NULL); mean_share [n_cells] (unless
 * NULL): those scores aggregated as scoring.aggregate's "mean" (each (layer, head) row over its sum,
 * averaged), +inf where not scored; keydiff_sums [n_layer][n_cells]: KeyDiff's scores summed over the
 * KV heads. Returns 0 or an error code (llamakv_error_string). */
int32_t llamakv_device_ea_scores(void * backend, void ** k_cache, void ** v_cache, const int32_t * v_trans,
                                 int32_t n_layer, int32_t stream, int64_t n_cells, int32_t n_head, int32_t n_head_kv,
                                 int32_t head_dim, const float * w, int32_t n_pairs, int32_t pair_kind,
                                 const float * caps, const float * sinks, const uint8_t * scored, int32_t use_vnorm,
                                 float epsilon, const int32_t * anchor_cells, int64_t n_anchor, float * out,
                                 float * mean_share, float * keydiff_sums);

/* Compaction's data movement on the device: for each of n_tensors (K, V) pairs of cache tensors,
 * cells 0 .. n_kept - 1 of `stream` take the contents of cells kept[0 .. n_kept) (ascending), bytes
 * unchanged; the cells' metadata is llama.cpp's to update (device.py). */
int32_t llamakv_device_gather(void * backend, void ** k_cache, void ** v_cache, const int32_t * v_trans, int32_t n_tensors,
                              int32_t stream, int64_t n_cells, const int32_t * kept, int64_t n_kept);
