// orthrus-gguf: compute graphs kept per kind of batch, so that Orthrus' alternating forwards
// reuse theirs.
//
// Upstream keeps one previous graph per "has outputs" (llama_context::gf_res_prev) in one
// scheduler. An Orthrus step alternates a diffusion forward and an AR verify of the same
// width, both with outputs and with different attention views, so each rebuilds the other's
// graph: nothing is ever reused, and on CUDA no graph is ever replayed.
//
// A slot here is the state upstream's reuse needs (a scheduler with its compute buffers, the
// two previous graph results, the active one) for one key (attention view, causal mask,
// tokens in the batch). llama_context::decode swaps the slot of its batch in for the call
// and back out afterwards, so upstream's own reuse test (llm_graph_result::can_reuse) keeps
// deciding, unchanged, whether the kept graph fits; a change of KV size, outputs or topology
// still rebuilds. Each slot's graphs are distinct tensors, so ggml-cuda keys a CUDA graph per
// slot and replays it. Batches that no slot takes (wide prompts, other architectures, pipeline
// parallelism) use the context's own state, exactly as upstream.
//
// An exact verify (LLAMA_ORTHRUS_EXACT_VERIFY) must compute every op of a CPU-resident layer
// on the CPU, and llama.cpp's op offload (llama_context_params.op_offload) sends the products
// of CPU-resident weights in batches of >= 32 rows (GGML_OP_OFFLOAD_MIN_BATCH) to a GPU or
// RPC backend, whose kernels are not batch-invariant. Op offload is a property of a
// scheduler, so exact verifies get schedulers of their own with it off (a slot keyed by it,
// or, where no slot takes the batch, exact_slot), and every other forward keeps the
// context's setting: prompts still go to the GPU.

#pragma once

#include "llama.h"
#include "llama-graph.h"

#include "ggml-backend.h"

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

struct llama_context;

struct llama_orthrus_graph_slot {
    int32_t  view     = 0;
    bool     causal   = true;
    uint32_t n_tokens = 0;
    bool     op_offload = false; // of its scheduler: the context's, or off for exact verifies
    uint64_t last_use = 0;

    // swapped with llama_context::sched, gf_res_prev, gf_res_prev_active
    ggml_backend_sched_ptr              sched;
    std::array<llm_graph_result_ptr, 2> res;
    llm_graph_result *                  active = nullptr;
};

struct llama_orthrus_graphs {
    // widest batch a slot takes: Orthrus blocks and one-token decodes, not prompts
    static constexpr uint32_t MAX_TOKENS = LLAMA_ORTHRUS_GRAPH_SLOT_TOKENS;
    // slots kept at most (least recently used dropped); the auto policy's warm widths
    // 1, 2, 4, ..., 32 for both views need 11
    static constexpr int32_t DEFAULT_MAX_SLOTS = 16;

    int32_t  max_slots = DEFAULT_MAX_SLOTS;
    uint64_t tick      = 0;
    const llama_orthrus_graph_slot * last = nullptr; // the slot of the previous decode (nullptr: none)
    std::vector<std::unique_ptr<llama_orthrus_graph_slot>> slots;
    // for an exact verify that needs op offload off and that no slot takes (no slots kept,
    // more than MAX_TOKENS or n_ubatch tokens, pipeline parallelism): made when first needed
    std::unique_ptr<llama_orthrus_graph_slot> exact_slot;

    // drop every slot but the `keep` most recently used (keep 0: exact_slot too; the context
    // is about to re-reserve its scheduler, or the cap shrinks)
    void clear(llama_context & ctx, int32_t keep = 0);

    int32_t n_kept() const { return (int32_t) slots.size() + (exact_slot ? 1 : 0); }

    size_t compute_bytes() const;

    // exchange the context's scheduler and previous graph results with the slot's
    static void swap(llama_context & ctx, llama_orthrus_graph_slot & s);

    // a slot for that key with a scheduler like the context's own (nullptr if none was made)
    static std::unique_ptr<llama_orthrus_graph_slot> make_slot(
            llama_context & ctx, int32_t view, bool causal, uint32_t n_tokens, bool op_offload);
};

// For the duration of one llama_context::decode: the slot of its batch in, and out on return;
// and, for a verify under LLAMA_ORTHRUS_EXACT_VERIFY (a llama_orthrus_verify, or the decode
// after a llama_orthrus_draft), the CPU reference kernels on, and off on return.
class llama_orthrus_graph_scope {
public:
    llama_orthrus_graph_scope(llama_context & ctx, uint32_t n_tokens);
    ~llama_orthrus_graph_scope();

    llama_orthrus_graph_scope(const llama_orthrus_graph_scope &) = delete;
    llama_orthrus_graph_scope & operator=(const llama_orthrus_graph_scope &) = delete;

private:
    llama_context & ctx;
    llama_orthrus_graph_slot * slot = nullptr;
    bool exact = false;
};
