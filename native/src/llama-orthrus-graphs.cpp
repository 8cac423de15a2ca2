// orthrus-gguf: compute graphs kept per kind of batch (see llama-orthrus-graphs.h).

#include "llama-orthrus-graphs.h"

#include "llama.h"
#include "llama-arch.h"
#include "llama-context.h"
#include "llama-impl.h"
#include "llama-model.h"

#include <algorithm>
#include <utility>

void llama_orthrus_graphs::swap(llama_context & ctx, llama_orthrus_graph_slot & s) {
    std::swap(ctx.sched,              s.sched);
    std::swap(ctx.gf_res_prev,        s.res);
    std::swap(ctx.gf_res_prev_active, s.active);
}

void llama_orthrus_graphs::clear(llama_context & ctx, int32_t keep) {
    const bool drop_exact = keep <= 0 && exact_slot;
    if ((int32_t) slots.size() <= keep && !drop_exact) {
        return;
    }
    // the backends are shared with the context's scheduler: one synchronize covers every slot
    if (ctx.sched) {
        ggml_backend_sched_synchronize(ctx.sched.get());
    }
    if (drop_exact) {
        exact_slot.reset();
    }
    // keep the most recently used
    std::sort(slots.begin(), slots.end(), [](const auto & a, const auto & b) { return a->last_use > b->last_use; });
    slots.resize(std::min(slots.size(), (size_t) std::max(0, keep)));
    last = nullptr;
}

static size_t orthrus_sched_bytes(const llama_orthrus_graph_slot * s) {
    size_t total = 0;
    ggml_backend_sched_t sched = s ? s->sched.get() : nullptr;
    for (int i = 0; sched != nullptr && i < ggml_backend_sched_get_n_backends(sched); ++i) {
        total += ggml_backend_sched_get_buffer_size(sched, ggml_backend_sched_get_backend(sched, i));
    }
    return total;
}

size_t llama_orthrus_graphs::compute_bytes() const {
    size_t total = orthrus_sched_bytes(exact_slot.get());
    for (const auto & s : slots) {
        total += orthrus_sched_bytes(s.get());
    }
    return total;
}

// the scheduler as llama_context::sched_reserve makes it, with the given op offload; its
// compute buffers grow to the first graph it allocates
std::unique_ptr<llama_orthrus_graph_slot> llama_orthrus_graphs::make_slot(
        llama_context & ctx, int32_t view, bool causal, uint32_t n_tokens, bool op_offload) {
    auto s = std::make_unique<llama_orthrus_graph_slot>();
    s->view       = view;
    s->causal     = causal;
    s->n_tokens   = n_tokens;
    s->op_offload = op_offload;
    s->sched.reset(ggml_backend_sched_new(ctx.backend_ptrs.data(), ctx.backend_buft.data(),
                                          ctx.backend_ptrs.size(), ctx.gf_res_reserve->get_max_nodes(),
                                          false, op_offload));
    return s->sched ? std::move(s) : nullptr;
}

llama_orthrus_graph_scope::llama_orthrus_graph_scope(llama_context & c, uint32_t n_tokens) : ctx(c) {
    // a verify (a llama_orthrus_verify, or the first decode after a draft): exact kernels for
    // it under EXACT_VERIFY, whatever the architecture
    if (ctx.orthrus_exact_next) {
        ctx.orthrus_exact_next = false;
        if (ctx.orthrus_exact == LLAMA_ORTHRUS_EXACT_VERIFY && ctx.cparams.orthrus_view == 0) {
            ctx.orthrus_cpu_use_ref(true);
            exact = true;
        }
    }
    // kept graphs for orthrus-qwen3 only; other architectures run as upstream, but for the
    // scheduler without op offload that an exact verify needs (and the decode after it)
    const bool orthrus = ctx.model.arch == LLM_ARCH_ORTHRUS_QWEN3;
    if (!orthrus && !exact && !(ctx.orthrus_graphs && ctx.orthrus_graphs->last)) {
        return;
    }
    auto & G = ctx.orthrus_graphs;
    if (!G) {
        G = std::make_shared<llama_orthrus_graphs>();
    }
    const auto & cp = ctx.cparams;
    // op offload as the context has it (and only where there is a backend to offload to),
    // but off for an exact verify (llama-orthrus-graphs.h)
    const bool offload_ctx = cp.op_offload && ctx.backend_ptrs.size() > 1;
    const bool offload     = offload_ctx && !exact;
    if (!ctx.sched) {
        G->last = nullptr;
        return;
    }
    if (!orthrus || G->max_slots <= 0 || cp.pipeline_parallel || n_tokens == 0 ||
        n_tokens > llama_orthrus_graphs::MAX_TOKENS || n_tokens > cp.n_ubatch) {
        // with no slots kept, one graph at a time as upstream: a change of scheduler rebuilds
        const bool single = !orthrus || G->max_slots <= 0;
        if (offload == offload_ctx) {
            if (single && G->last != nullptr) {
                ctx.gf_res_prev_active = nullptr;
            }
            G->last = nullptr; // the context's own state runs this batch
            return;
        }
        if (!G->exact_slot) {
            G->exact_slot = llama_orthrus_graphs::make_slot(ctx, 0, true, 0, false);
        }
        slot = G->exact_slot.get();
        if (single && slot != nullptr && G->last != slot) {
            slot->active = nullptr;
        }
    } else {
        for (auto & s : G->slots) {
            if (s->view == cp.orthrus_view && s->causal == cp.causal_attn && s->n_tokens == n_tokens &&
                s->op_offload == offload) {
                slot = s.get();
                break;
            }
        }
        if (slot == nullptr) {
            G->clear(ctx, G->max_slots - 1); // room for one more
            auto s = llama_orthrus_graphs::make_slot(ctx, cp.orthrus_view, cp.causal_attn, n_tokens, offload);
            slot = s.get();
            if (s) {
                G->slots.push_back(std::move(s));
            }
        }
    }
    if (slot == nullptr) {
        if (offload != offload_ctx) {
            LLAMA_LOG_WARN("%s: no scheduler without op offload could be made: this verify may not be exact\n", __func__);
        }
        G->last = nullptr; // no scheduler could be made: the context's own state
        return;
    }
    if (G->last != slot) {
        // another scheduler ran the previous decode: let its work (and output copies) finish
        ggml_backend_sched_synchronize(ctx.sched.get());
    }
    slot->last_use = ++G->tick;
    G->last = slot;
    llama_orthrus_graphs::swap(ctx, *slot);
}

llama_orthrus_graph_scope::~llama_orthrus_graph_scope() {
    if (slot != nullptr) {
        llama_orthrus_graphs::swap(ctx, *slot);
    }
    if (exact) {
        ctx.orthrus_cpu_use_ref(false);
    }
}

// ---------------------------------------------------------------- llama_context hooks

void llama_context::orthrus_graphs_clear() {
    if (orthrus_graphs) {
        orthrus_graphs->clear(*this);
    }
}

void llama_context::orthrus_graphs_set_max(int32_t max_slots) {
    if (!orthrus_graphs) {
        orthrus_graphs = std::make_shared<llama_orthrus_graphs>();
    }
    orthrus_graphs->clear(*this, max_slots);
    orthrus_graphs->max_slots = max_slots;
}

int32_t llama_context::orthrus_graphs_info(size_t * compute_bytes) const {
    if (compute_bytes != nullptr) {
        *compute_bytes = orthrus_graphs ? orthrus_graphs->compute_bytes() : 0;
    }
    return orthrus_graphs ? orthrus_graphs->n_kept() : 0;
}

// ---------------------------------------------------------------- C API

extern "C" {

int32_t llama_orthrus_set_graph_slots(llama_context * ctx, int32_t max_slots) {
    if (ctx == nullptr || max_slots < 0 || max_slots > LLAMA_ORTHRUS_MAX_GRAPH_SLOTS) {
        return LLAMA_ORTHRUS_ERR_ARG;
    }
    ctx->orthrus_graphs_set_max(max_slots);
    return LLAMA_ORTHRUS_OK;
}

int32_t llama_orthrus_graph_slots(const llama_context * ctx, size_t * compute_bytes) {
    if (ctx == nullptr) {
        if (compute_bytes != nullptr) {
            *compute_bytes = 0;
        }
        return 0;
    }
    return ctx->orthrus_graphs_info(compute_bytes);
}

} // extern "C"
