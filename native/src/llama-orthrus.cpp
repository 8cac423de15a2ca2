// orthrus-gguf: the C API of the orthrus-qwen3 diffusion view (declared in llama.h).
//
// Every entry point validates its arguments and returns an LLAMA_ORTHRUS_* status, so
// that nothing reachable from Python can hit a GGML_ASSERT (a non-causal batch longer
// than n_ubatch, more tokens than n_batch, positions that do not follow the cache).

#include "llama.h"
#include "llama-context.h"
#include "llama-model.h"
#include "models/models.h"

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

void llama_context::set_orthrus_view(int32_t view) {
    // graph shapes do not depend on the view (only which weights are read), so like
    // set_causal_attn this needs no scheduler reserve; allow_reuse compares the flag
    cparams.orthrus_view = view;
}

int32_t llama_context::get_orthrus_view() const {
    return cparams.orthrus_view;
}

int32_t llama_context::get_orthrus_n_outputs() const {
    return (int32_t) n_outputs;
}

// EXACT_ALL keeps the reference mode on between forwards (and leaving it turns it off);
// EXACT_VERIFY switches it on around each verify only (llama_orthrus_graph_scope). Otherwise
// the mode stays as the backend started (GGML_CPU_USE_REF).
//
// Exact forwards must also keep every op of a CPU-resident layer on the CPU: llama.cpp's op
// offload sends the products of CPU-resident weights in batches of >= 32 rows
// (GGML_OP_OFFLOAD_MIN_BATCH) to a GPU or RPC backend, whose kernels are not batch-invariant,
// so a 32-token verify would not match its one-token forwards. EXACT_VERIFY runs its verifies
// on schedulers of their own without op offload (llama-orthrus-graphs.h), so prompts keep it;
// EXACT_ALL turns it off for the context, and leaving ALL gives back the context's own
// setting; the next decode re-reserves the scheduler (and drops the kept graphs) when that
// changes it.
void llama_context::set_orthrus_exact(int32_t mode) {
    const bool was_all = orthrus_exact == LLAMA_ORTHRUS_EXACT_ALL;
    const bool all     = mode == LLAMA_ORTHRUS_EXACT_ALL;
    if (was_all != all) {
        orthrus_cpu_use_ref(all);
        if (backend_ptrs.size() > 1) { // only the CPU: nothing to offload to
            if (all) {
                orthrus_op_offload = cparams.op_offload;
            }
            const bool op_offload = !all && orthrus_op_offload;
            if (cparams.op_offload != op_offload) {
                cparams.op_offload = op_offload;
                sched_need_reserve = true;
            }
        }
    }
    orthrus_exact = mode;
}

int32_t llama_context::get_orthrus_exact() const {
    return orthrus_exact;
}

void llama_context::set_orthrus_exact_next(bool value) {
    orthrus_exact_next = value;
}

// The CPU backend's reference mode (ggml_backend_cpu_set_use_ref, read at each compute, so
// it can change between forwards without a new graph). Looked up through the backend
// registry, as llama-context.cpp does for the thread count.
void llama_context::orthrus_cpu_use_ref(bool value) {
    if (backend_cpu == nullptr) {
        return;
    }
    using set_use_ref_t = void (*)(ggml_backend_t, bool);
    static set_use_ref_t fn = nullptr;
    if (fn == nullptr) {
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(ggml_backend_get_device(backend_cpu));
        fn = (set_use_ref_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_cpu_set_use_ref");
    }
    if (fn != nullptr) {
        fn(backend_cpu, value);
    }
}

static const llama_model_orthrus_qwen3 * orthrus_model_of(const llama_model * model) {
    if (model == nullptr || model->arch != LLM_ARCH_ORTHRUS_QWEN3) {
        return nullptr;
    }
    return static_cast<const llama_model_orthrus_qwen3 *>(model);
}

static int32_t orthrus_n_vocab(const llama_context * ctx) {
    return llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(ctx)));
}

static int32_t orthrus_status_of_decode(int32_t ret) {
    switch (ret) {
        case 0:  return LLAMA_ORTHRUS_OK;
        case 1:  return LLAMA_ORTHRUS_ERR_KV_FULL;
        case 2:  return LLAMA_ORTHRUS_ERR_ABORTED;
        default: return LLAMA_ORTHRUS_ERR_DECODE;
    }
}

// the checks shared by draft and verify: n tokens at p of sequence seq
static int32_t orthrus_check_span(llama_context * ctx, llama_seq_id seq, llama_pos p, int32_t n) {
    if (seq < 0 || (uint32_t) seq >= llama_n_seq_max(ctx)) {
        return LLAMA_ORTHRUS_ERR_SEQ;
    }
    // every row has logits: llama.cpp asserts a batch's outputs fit the context's n_outputs_max
    if ((uint32_t) n > llama_n_batch(ctx) || (uint32_t) n > ctx->get_cparams().n_outputs_max) {
        return LLAMA_ORTHRUS_ERR_BATCH;
    }
    llama_memory_t mem = llama_get_memory(ctx);
    if (mem == nullptr) {
        return LLAMA_ORTHRUS_ERR_MEMORY;
    }
    if (p < 0 || p != llama_memory_seq_pos_max(mem, seq) + 1) {
        return LLAMA_ORTHRUS_ERR_POS;
    }
    if ((int64_t) p + n > (int64_t) llama_n_ctx_seq(ctx)) {
        return LLAMA_ORTHRUS_ERR_CTX;
    }
    return LLAMA_ORTHRUS_OK;
}

// decode tokens[0..n) at p.. of seq, logits for every row
static int32_t orthrus_decode_all(llama_context * ctx, llama_seq_id seq, const llama_token * tokens, int32_t n, llama_pos p) {
    llama_batch batch = llama_batch_init(n, 0, 1);
    for (int32_t i = 0; i < n; ++i) {
        batch.token[i]     = tokens[i];
        batch.pos[i]       = p + i;
        batch.n_seq_id[i]  = 1;
        batch.seq_id[i][0] = seq;
        batch.logits[i]    = 1;
    }
    batch.n_tokens = n;
    const int32_t ret = llama_decode(ctx, batch);
    llama_batch_free(batch);
    if (ret == 0) {
        llama_synchronize(ctx); // like llama_orthrus_draft_seqs: the forward, not its launch
    }
    return orthrus_status_of_decode(ret);
}

extern "C" {

const char * llama_orthrus_strerror(int32_t status) {
    switch (status) {
        case LLAMA_ORTHRUS_OK:              return "ok";
        case LLAMA_ORTHRUS_ERR_NOT_ORTHRUS: return "the model is not orthrus-qwen3";
        case LLAMA_ORTHRUS_ERR_ARG:         return "invalid argument (null pointer, view, length or token id)";
        case LLAMA_ORTHRUS_ERR_SEQ:         return "sequence id outside [0, n_seq_max)";
        case LLAMA_ORTHRUS_ERR_UBATCH:      return "diffusion block longer than n_ubatch (a non-causal batch cannot be split)";
        case LLAMA_ORTHRUS_ERR_BATCH:       return "more tokens than n_batch, or more rows of logits than the context's n_outputs_max";
        case LLAMA_ORTHRUS_ERR_POS:         return "position does not follow the cache (p != seq_pos_max + 1)";
        case LLAMA_ORTHRUS_ERR_CTX:         return "p + n exceeds the context size of the sequence";
        case LLAMA_ORTHRUS_ERR_MEMORY:      return "the context has no KV cache";
        case LLAMA_ORTHRUS_ERR_KV_FULL:     return "no KV cache slot for the batch (llama_decode returned 1)";
        case LLAMA_ORTHRUS_ERR_ABORTED:     return "decode aborted by the abort callback";
        case LLAMA_ORTHRUS_ERR_DECODE:      return "llama_decode failed";
        case LLAMA_ORTHRUS_ERR_ROWS:        return "the last decode produced fewer rows of logits than asked for";
        case LLAMA_ORTHRUS_ERR_SEQ_RM:      return "could not remove the diffusion block from the KV cache";
        case LLAMA_ORTHRUS_ERR_SPLIT:       return "the blocks of a multi-sequence draft would be split across ubatches (more than n_ubatch tokens, or lengths differ in a non-unified KV cache)";
        case LLAMA_ORTHRUS_ERR_NOT_SAMPLED: return "a row of the last decode has no backend-sampled token (no backend sampler on its sequence)";
        default:                            return "unknown orthrus status";
    }
}

int32_t llama_orthrus_set_view(llama_context * ctx, int32_t view) {
    if (ctx == nullptr || (view != 0 && view != 1)) {
        return LLAMA_ORTHRUS_ERR_ARG;
    }
    if (view == 1 && orthrus_model_of(llama_get_model(ctx)) == nullptr) {
        return LLAMA_ORTHRUS_ERR_NOT_ORTHRUS;
    }
    ctx->set_orthrus_view(view);
    return LLAMA_ORTHRUS_OK;
}

int32_t llama_orthrus_get_view(const llama_context * ctx) {
    return ctx ? ctx->get_orthrus_view() : 0;
}

int32_t llama_model_orthrus_block_size(const llama_model * model) {
    const auto * om = orthrus_model_of(model);
    return om ? (int32_t) om->block_size : 0;
}

int32_t llama_model_orthrus_mask_token(const llama_model * model) {
    const auto * om = orthrus_model_of(model);
    return om ? (int32_t) om->mask_token_id : -1;
}

int32_t llama_orthrus_draft(llama_context * ctx, llama_seq_id seq, llama_token t, llama_pos p, int32_t n_block) {
    return llama_orthrus_draft_seqs(ctx, 1, &seq, &t, &p, &n_block);
}

int32_t llama_orthrus_draft_seqs(llama_context * ctx, int32_t n_seqs, const llama_seq_id * seqs,
                                 const llama_token * ts, const llama_pos * ps, const int32_t * n_blocks) {
    if (ctx == nullptr) {
        return LLAMA_ORTHRUS_ERR_ARG;
    }
    const auto * om = orthrus_model_of(llama_get_model(ctx));
    if (om == nullptr) {
        return LLAMA_ORTHRUS_ERR_NOT_ORTHRUS;
    }
    if (n_seqs < 1 || seqs == nullptr || ts == nullptr || ps == nullptr || n_blocks == nullptr) {
        return LLAMA_ORTHRUS_ERR_ARG;
    }
    const int32_t n_vocab = orthrus_n_vocab(ctx);
    const llama_token mask = (llama_token) om->mask_token_id;
    if (mask < 0 || mask >= n_vocab) {
        return LLAMA_ORTHRUS_ERR_ARG;
    }
    int64_t n_total = 0;
    for (int32_t j = 0; j < n_seqs; ++j) {
        if (n_blocks[j] < 2 || ts[j] < 0 || ts[j] >= n_vocab) {
            return LLAMA_ORTHRUS_ERR_ARG;
        }
        for (int32_t k = 0; k < j; ++k) {
            if (seqs[k] == seqs[j]) {
                return LLAMA_ORTHRUS_ERR_ARG; // two blocks of one sequence would see each other
            }
        }
        if ((uint32_t) n_blocks[j] > llama_n_ubatch(ctx)) {
            return LLAMA_ORTHRUS_ERR_UBATCH;
        }
        const int32_t status = orthrus_check_span(ctx, seqs[j], ps[j], n_blocks[j]);
        if (status != LLAMA_ORTHRUS_OK) {
            return status;
        }
        n_total += n_blocks[j];
    }
    if (n_total > (int64_t) llama_n_ubatch(ctx)) {
        return LLAMA_ORTHRUS_ERR_SPLIT;
    }
    const llama_cparams & cparams = ctx->get_cparams();
    if (n_total > (int64_t) llama_n_batch(ctx) || n_total > (int64_t) cparams.n_outputs_max) {
        return LLAMA_ORTHRUS_ERR_BATCH;
    }
    // one KV stream per sequence: llama_decode splits the batch into equal per-sequence
    // slices, which keeps every block whole only when all blocks have one length
    if (!cparams.kv_unified && llama_n_seq_max(ctx) > 1) {
        for (int32_t j = 1; j < n_seqs; ++j) {
            if (n_blocks[j] != n_blocks[0]) {
                return LLAMA_ORTHRUS_ERR_SPLIT;
            }
        }
    }

    llama_batch batch = llama_batch_init((int32_t) n_total, 0, 1);
    int32_t i = 0;
    for (int32_t j = 0; j < n_seqs; ++j) {
        for (int32_t k = 0; k < n_blocks[j]; ++k, ++i) {
            batch.token[i]     = k == 0 ? ts[j] : mask;
            batch.pos[i]       = ps[j] + k;
            batch.n_seq_id[i]  = 1;
            batch.seq_id[i][0] = seqs[j];
            batch.logits[i]    = 1;
        }
    }
    batch.n_tokens = (int32_t) n_total;

    const int32_t view_org   = ctx->get_orthrus_view();
    const bool    causal_org = ctx->get_causal_attn();

    ctx->set_orthrus_view(1);
    ctx->set_causal_attn(false);

    int32_t status = orthrus_status_of_decode(llama_decode(ctx, batch));
    llama_batch_free(batch);
    if (status == LLAMA_ORTHRUS_OK) {
        // llama_decode returns while a GPU still computes (the wait comes with the next read
        // of the logits). Every caller reads them next, so waiting here costs nothing, and a
        // timer around a draft or verify (the auto length's calibration) times the forward,
        // not its launch.
        llama_synchronize(ctx);
    }

    // the blocks' diffusion K/V must never outlive the pass, whatever happened
    for (int32_t j = 0; j < n_seqs; ++j) {
        if (!llama_memory_seq_rm(llama_get_memory(ctx), seqs[j], ps[j], -1) && status == LLAMA_ORTHRUS_OK) {
            status = LLAMA_ORTHRUS_ERR_SEQ_RM;
        }
    }

    ctx->set_causal_attn(causal_org);
    ctx->set_orthrus_view(view_org);

    // a loop that verifies with its own llama_decode (llama-cpp-python's Llama, llama-server)
    // gets its verify on the exact kernels too (llama_orthrus_graph_scope)
    ctx->set_orthrus_exact_next(status == LLAMA_ORTHRUS_OK);

    return status;
}

int32_t llama_orthrus_verify(llama_context * ctx, llama_seq_id seq, const llama_token * tokens, int32_t n, llama_pos p) {
    if (ctx == nullptr || tokens == nullptr || n < 1) {
        return LLAMA_ORTHRUS_ERR_ARG;
    }
    const int32_t n_vocab = orthrus_n_vocab(ctx);
    for (int32_t i = 0; i < n; ++i) {
        if (tokens[i] < 0 || tokens[i] >= n_vocab) {
            return LLAMA_ORTHRUS_ERR_ARG;
        }
    }
    int32_t status = orthrus_check_span(ctx, seq, p, n);
    if (status != LLAMA_ORTHRUS_OK) {
        return status;
    }

    const int32_t view_org   = ctx->get_orthrus_view();
    const bool    causal_org = ctx->get_causal_attn();

    ctx->set_orthrus_view(0);
    ctx->set_causal_attn(true);

    // a verify: under EXACT_VERIFY on batch-invariant kernels (and without op offload), so that
    // its rows equal one-token forwards (llama_orthrus_graph_scope)
    ctx->set_orthrus_exact_next(true);
    status = orthrus_decode_all(ctx, seq, tokens, n, p);
    ctx->set_orthrus_exact_next(false); // also where llama_decode returned before taking it
    if (status != LLAMA_ORTHRUS_OK) {
        // leave the cache holding exactly the positions < p
        llama_memory_seq_rm(llama_get_memory(ctx), seq, p, -1);
    }

    ctx->set_causal_attn(causal_org);
    ctx->set_orthrus_view(view_org);

    return status;
}

int32_t llama_orthrus_n_outputs(const llama_context * ctx) {
    return ctx ? ctx->get_orthrus_n_outputs() : 0;
}

// The argmax of one row: the first index of its largest value (ties keep the lowest id, as
// numpy and torch do), NaNs never winning; 0 for a row of NaNs and -inf.
//
// A running argmax is a compare-and-branch chain, about 1 ns per logit: 7 ms for the 31
// rows of a 152k-token vocabulary, more than a whole forward on a GPU. Here U x 4 lanes keep
// their own running (max, first index) with branch-free selects, in one pass over memory;
// GCC and Clang compile the vector types to SSE/AVX or NEON. Per lane, strict > keeps the
// earliest index; across lanes, the largest value, then the lowest index, wins.
static llama_token orthrus_row_argmax(const float * row, int64_t n) {
    float   best   = -INFINITY;
    int64_t best_i = 0;
    int64_t j      = 0;
#if defined(__GNUC__) || defined(__clang__)
    typedef float   f32x4 __attribute__((vector_size(16)));
    typedef int32_t i32x4 __attribute__((vector_size(16)));
    constexpr int U = 4;
    if (n < INT32_MAX - 4*U) {
        f32x4 m[U];
        i32x4 mi[U], idx[U];
        for (int u = 0; u < U; ++u) {
            for (int k = 0; k < 4; ++k) {
                m[u][k]   = -INFINITY;
                mi[u][k]  = 0;
                idx[u][k] = 4*u + k;
            }
        }
        const i32x4 step = {4*U, 4*U, 4*U, 4*U};
        for (; j + 4*U <= n; j += 4*U) {
            for (int u = 0; u < U; ++u) {
                f32x4 v;
                memcpy(&v, row + j + 4*u, sizeof(v));
                const i32x4 gt = v > m[u]; // all ones where the new value is strictly larger
                m[u]  = (f32x4) (((i32x4) v & gt) | ((i32x4) m[u] & ~gt));
                mi[u] = (idx[u] & gt) | (mi[u] & ~gt);
                idx[u] += step;
            }
        }
        for (int u = 0; u < U; ++u) {
            for (int k = 0; k < 4; ++k) {
                if (m[u][k] > best || (m[u][k] == best && m[u][k] > -INFINITY && mi[u][k] < best_i)) {
                    best   = m[u][k];
                    best_i = mi[u][k];
                }
            }
        }
    }
#endif
    for (; j < n; ++j) { // the tail (and the whole row without vector types)
        if (row[j] > best) {
            best   = row[j];
            best_i = j;
        }
    }
    return (llama_token) best_i;
}

int32_t llama_orthrus_argmax_rows(const float * logits, int32_t n_rows, int64_t n_vocab, llama_token * out) {
    if (n_rows < 0 || n_vocab < 1 || (n_rows > 0 && (logits == nullptr || out == nullptr))) {
        return LLAMA_ORTHRUS_ERR_ARG;
    }
    for (int32_t r = 0; r < n_rows; ++r) {
        out[r] = orthrus_row_argmax(logits + r*n_vocab, n_vocab);
    }
    return LLAMA_ORTHRUS_OK;
}

int32_t llama_orthrus_argmax(llama_context * ctx, int32_t n_rows, llama_token * out) {
    if (ctx == nullptr || out == nullptr || n_rows < 0) {
        return LLAMA_ORTHRUS_ERR_ARG;
    }
    if (n_rows == 0) {
        return LLAMA_ORTHRUS_OK;
    }
    if (n_rows > ctx->get_orthrus_n_outputs()) {
        return LLAMA_ORTHRUS_ERR_ROWS;
    }
    const float * logits = llama_get_logits(ctx); // [n_outputs][n_vocab], in batch order
    if (logits == nullptr) {
        return LLAMA_ORTHRUS_ERR_ROWS;
    }
    return llama_orthrus_argmax_rows(logits, n_rows, orthrus_n_vocab(ctx), out);
}

int32_t llama_orthrus_sampled(llama_context * ctx, int32_t n_rows, llama_token * out) {
    if (ctx == nullptr || out == nullptr || n_rows < 0) {
        return LLAMA_ORTHRUS_ERR_ARG;
    }
    const int32_t n_out = ctx->get_orthrus_n_outputs();
    if (n_rows > n_out) {
        return LLAMA_ORTHRUS_ERR_ROWS;
    }
    ctx->synchronize(); // once: llama_get_sampled_token_ith would wait for every row
    for (int32_t r = 0; r < n_rows; ++r) {
        // a negative index counts output rows from the end, whatever batch index holds them
        const llama_token t = ctx->get_sampled_token_ith(r - n_out);
        if (t == LLAMA_TOKEN_NULL) {
            return LLAMA_ORTHRUS_ERR_NOT_SAMPLED;
        }
        out[r] = t;
    }
    return LLAMA_ORTHRUS_OK;
}

} // extern "C"

// ---------------------------------------------------------------- logging from C

static std::atomic<int32_t> orthrus_log_min_level{GGML_LOG_LEVEL_ERROR};
static std::atomic<int32_t> orthrus_log_last_level{GGML_LOG_LEVEL_NONE};

static void orthrus_log_to_stderr(enum ggml_log_level level, const char * text, void * /*user_data*/) {
    int32_t lvl = level;
    if (lvl == GGML_LOG_LEVEL_CONT) {
        lvl = orthrus_log_last_level.load();
    } else {
        orthrus_log_last_level.store(lvl);
    }
    if (lvl >= orthrus_log_min_level.load()) {
        fputs(text, stderr);
        fflush(stderr);
    }
}

extern "C" int32_t llama_orthrus_set_exact(llama_context * ctx, int32_t exact) {
    if (ctx == nullptr) {
        return LLAMA_ORTHRUS_ERR_ARG;
    }
    if (exact < LLAMA_ORTHRUS_EXACT_OFF || exact > LLAMA_ORTHRUS_EXACT_ALL) {
        return LLAMA_ORTHRUS_ERR_ARG;
    }
    ctx->set_orthrus_exact(exact);
    return LLAMA_ORTHRUS_OK;
}

extern "C" void llama_orthrus_log_set_min_level(int32_t min_level) {
    orthrus_log_min_level.store(min_level);
    llama_log_set(orthrus_log_to_stderr, nullptr);
}
