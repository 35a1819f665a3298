/* llamakv capture shim: the state shared between the C eval callback and Python (cffi).
 * Only plain C types here: cffi parses this file (preprocessor lines are stripped). */

typedef struct llamakv_capture {
    /* configuration, written by Python before decoding */
    int32_t n_layer, n_head, n_head_kv, head_dim;
    int32_t n_ubatch;          /* largest ubatch: sizes the staging buffers */
    int32_t capacity;          /* rows of the key store */
    int32_t q_normed;          /* 1: pre-RoPE query is `Qcur_normed-N` (QK-norm models) */
    int32_t n_sink;            /* positions below this are left out of the statistics */
    int32_t enabled;           /* 0: the callback observes nothing */
    int32_t stats_enabled;     /* 0: keys and values are still stored, queries not accumulated */

    /* key store, one row per captured token (written by the callback, compacted by Python) */
    int32_t n_rows;
    uint16_t * keys;           /* [capacity][n_layer][n_head_kv][head_dim], fp16, after RoPE */
    float * vnorm;             /* [capacity][n_layer][n_head_kv], L2 norm of each value head */
    int32_t * pos;             /* [capacity] */

    /* query statistics, per layer (Welford / Chan: count, mean, M2; optional comoment) */
    double * q_count;          /* [n_layer] */
    double * q_mean;           /* [n_layer][n_head][head_dim] */
    double * q_m2;             /* [n_layer][n_head][head_dim] */
    double * q_cov;            /* [n_layer][n_head][head_dim][head_dim] or NULL */

    /* what the graph tells us */
    int32_t * rope_params;     /* [n_layer][16]: the K ROPE node's op_params */
    float * rope_factors;      /* [n_layer][head_dim/2]: the ROPE node's frequency factors */
    int32_t * rope_has_factors;/* [n_layer] */
    int32_t * rope_seen;       /* [n_layer] */
    int32_t * n_kv;            /* [n_layer]: width of the last attention (cells attended) */

    /* optional probe: copy the F32 tensor with this name and op (tests, debugging) */
    char probe_name[64];
    int32_t probe_op;
    float * probe_buf;
    int64_t probe_cap;         /* floats */
    int64_t probe_n;           /* floats written by the last match */
    int64_t probe_ne[4];

    /* staging (allocated by Python) */
    float * q_stage;           /* [n_ubatch][n_head][head_dim] */
    float * v_stage;           /* [n_ubatch][n_head_kv]: value norms */
    double * q_work;           /* [2 * head_dim]: per-head batch mean and deviation */
    float * kv_stage;          /* [n_ubatch][n_head_kv][head_dim]: keys or values being read */
    float * scratch;           /* [n_ubatch * (n_head + 2*n_head_kv) * head_dim]: strided reads */
    int32_t * pos_stage;       /* [n_ubatch] */

    /* progress of the current ubatch */
    int32_t last_k_layer;      /* layer of the last K seen, -1 before the first */
    int32_t ubatch_row0;       /* first key-store row of the current ubatch */
    int32_t ubatch_n_tok;
    int32_t q_pending;         /* layer whose staged query waits for its positions, -1 if none */
    int32_t v_pending;
    int64_t n_observed;        /* tensors copied so far */
    int64_t capture_ns;        /* time spent copying and accumulating */
    int32_t error;             /* first error, 0 if none; see llamakv_error_string */
} llamakv_capture;

