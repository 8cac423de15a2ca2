// orthrus-gguf: self-drafting with the diffusion view of an orthrus-qwen3 target.
//
// The drafter runs on the target context itself (no second model, no second KV cache):
// llama_orthrus_draft decodes [t, M, ..., M] at p.. with the diffusion view and leaves the
// cache exactly as it was. common/speculative.cpp wraps it as the speculative type
// "orthrus" (a thin adapter); the server verifies the drafts as for any other type.

#pragma once

#include "common.h"
#include "llama.h"

#include <cstdint>
#include <vector>

struct common_orthrus_drafter;

// Resolve the orthrus settings of `params` before the target context is created (the
// server sizes its output buffers from the draft length): reads the model's GGUF metadata,
// sets speculative.draft.n_max to block size - 1 unless --spec-draft-n-max was given (then
// caps it there), and drops the "orthrus" type, with a warning, for a model that is not
// orthrus-qwen3. Returns false if orthrus drafting ends up disabled.
bool common_orthrus_prepare(common_params & params);

// ctx: the target context. n_max: most drafted tokens per step (block = n_max + 1).
// auto_len: pick the length per step from measured costs and acceptance (may be 0).
// Throws std::runtime_error when the model is not orthrus-qwen3 or n_max is out of range.
common_orthrus_drafter * common_orthrus_init(llama_context * ctx, int32_t n_max, bool auto_len, uint32_t n_seq);

void common_orthrus_free(common_orthrus_drafter * d);

// Draft at most n_max tokens following id_last, which sits at pos0 (the cache of seq holds
// exactly the positions < pos0). Appends the drafts to result (nothing if a draft does not pay).
void common_orthrus_draft(common_orthrus_drafter * d, llama_seq_id seq, llama_token id_last,
                          llama_pos pos0, int32_t n_max, std::vector<llama_token> & result);

// The target accepted n_accepted of the tokens of the last draft of seq.
void common_orthrus_accept(common_orthrus_drafter * d, llama_seq_id seq, int32_t n_accepted);

// The most drafts per step this drafter makes (its block size - 1).
int32_t common_orthrus_n_max(const common_orthrus_drafter * d);
