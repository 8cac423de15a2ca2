// orthrus-gguf: self-drafting with the diffusion view of an orthrus-qwen3 target.
//
// The drafter runs on the target context itself (no second model, no second KV cache):
// llama_orthrus_draft decodes [t, M, ..., M] at p.. with the diffusion view and leaves the
// cache exactly as it was. common/speculative.cpp wraps it as the speculative type
// "orthrus" (a thin adapter); the server verifies the drafts as for any other type.
//
// Sampled requests (temperature > 0) use speculative sampling (docs/ALGORITHM.md): drafts are
// drawn from q, the slot's sampler chain applied to the 64 highest logits of each
// diffusion row (any known q keeps the output exact; this one is cheap), and the verify
// keeps draft i with probability min(1, p_i(d_i) / q_i(d_i)), p_i being the same chain on
// the AR row; at the first rejection it draws from normalize(max(0, p_i - q_i)). The
// output has the AR distribution exactly and keeps more drafts than token matching.

#pragma once

#include "common.h"
#include "llama.h"
#include "sampling.h"

#include <cstdint>
#include <vector>

struct common_orthrus_drafter;
struct common_speculative;

// The orthrus drafter of a speculative context, or nullptr (spec null or no orthrus type).
// Defined in common/speculative.cpp, which owns the implementations.
common_orthrus_drafter * common_speculative_get_orthrus(common_speculative * spec);

// Resolve the orthrus settings of `params` before the target context is created (the
// server sizes its output buffers from the draft length): reads the model's GGUF metadata,
// sets speculative.draft.n_max to block size - 1 unless --spec-draft-n-max was given (then
// caps it there), and drops the "orthrus" type, with a warning, for a model that is not
// orthrus-qwen3. Returns false if orthrus drafting ends up disabled.
bool common_orthrus_prepare(common_params & params);

// ctx: the target context. From params: draft.n_max, the most drafted tokens per step
// (block = n_max + 1); orthrus_auto, pick the length per step from measured costs and
// acceptance (may be 0); orthrus_match, sampled requests draft greedily and keep drafts by
// token matching (upstream's rule) instead of speculative sampling; orthrus_per_slot, one
// diffusion forward per drafting sequence (the path before batched drafting, kept to
// measure against it); draft.n_min, drafts shorter than this are dropped; draft.p_min,
// drafts end at the first row whose top probability is lower (0: off).
// Throws std::runtime_error when the model is not orthrus-qwen3 or n_max is out of range.
common_orthrus_drafter * common_orthrus_init(llama_context * ctx, const common_params_speculative & params, uint32_t n_seq);

void common_orthrus_free(common_orthrus_drafter * d);

// One sequence's draft request: at most n_max (< 0: no cap) tokens following id_last,
// which sits at pos0 (the cache of seq holds exactly the positions < pos0); the drafts are
// appended to *result (nothing if a draft does not pay).
struct common_orthrus_draft_request {
    llama_seq_id seq;
    llama_token  id_last;
    llama_pos    pos0;
    int32_t      n_max;
    std::vector<llama_token> * result;
};

// Draft for every request at once: one diffusion forward holds the blocks of all of them
// (llama_orthrus_draft_seqs), more only where n_ubatch forbids it. Without a unified KV
// cache a forward's blocks need one length: shorter ones are padded with masks (their
// extra rows unused). Each sequence keeps its own auto length.
void common_orthrus_draft_all(common_orthrus_drafter * d, const std::vector<common_orthrus_draft_request> & reqs);

// Counters since init: server iterations that drafted, diffusion forwards, blocks drafted.
struct common_orthrus_stats {
    int64_t n_steps    = 0;
    int64_t n_forwards = 0;
    int64_t n_blocks   = 0;
};
void common_orthrus_get_stats(const common_orthrus_drafter * d, common_orthrus_stats & out);

// A request starts on seq with sampler smpl (nullptr: none). Speculative sampling applies
// when params.temp > 0, no grammar or reasoning budget constrains smpl, and its chain ends
// in the `dist` sampler; its random draws are seeded from the sampler's seed. No-op if d
// is nullptr.
void common_orthrus_set_sampler(common_orthrus_drafter * d, llama_seq_id seq, common_sampler * smpl,
                                const common_params_sampling & params);

// Verify the draft of seq against the target rows idxs (one per draft token, then the
// bonus row), accepting the emitted tokens into smpl: speculative sampling if the draft is
// (a prefix of) the last sampled draft of seq, else common_sampler_sample_and_accept_n.
// Returns the emitted tokens: the accepted drafts, then one token drawn by the target.
std::vector<llama_token> common_orthrus_sample_and_accept_n(common_orthrus_drafter * d, llama_seq_id seq,
                                                            common_sampler * smpl, llama_context * ctx,
                                                            const std::vector<int> & idxs,
                                                            const llama_tokens & draft);

// The target accepted n_accepted of the tokens of the last draft of seq.
void common_orthrus_accept(common_orthrus_drafter * d, llama_seq_id seq, int32_t n_accepted);

// The most drafts per step this drafter makes (its block size - 1).
int32_t common_orthrus_n_max(const common_orthrus_drafter * d);
