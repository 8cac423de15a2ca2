#pragma once

// orthrus-qwen3: a Qwen3 with a second ("diffusion") attention view per layer.
// Included at the end of models.h by patches/0002; see native/README.md.

#include <cstdint>
#include <vector>

// The six tensors of a layer's diffusion view; everything else is the Qwen3 layer's.
struct llama_orthrus_diff_layer {
    ggml_tensor * wq     = nullptr; // attn_q_diff      [n_embd, n_head*head_dim]
    ggml_tensor * wk     = nullptr; // attn_k_diff      [n_embd, n_head_kv*head_dim]
    ggml_tensor * wv     = nullptr; // attn_v_diff      [n_embd, n_head_kv*head_dim]
    ggml_tensor * wo     = nullptr; // attn_output_diff [n_head*head_dim, n_embd]
    ggml_tensor * q_norm = nullptr; // attn_q_norm_diff [head_dim]
    ggml_tensor * k_norm = nullptr; // attn_k_norm_diff [head_dim]
};

struct llama_model_orthrus_qwen3 : public llama_model_qwen3 {
    llama_model_orthrus_qwen3(const struct llama_model_params & params) : llama_model_qwen3(params) {}

    uint32_t block_size    = 0;
    uint32_t mask_token_id = 0;

    std::vector<llama_orthrus_diff_layer> diff_layers;

    void load_arch_hparams(llama_model_loader & ml) override;
    void load_arch_tensors(llama_model_loader & ml) override;

    // the diffusion view: Qwen3 with the _diff attention projections and norms
    struct graph_diffusion : public llm_graph_context {
        graph_diffusion(const llama_model_orthrus_qwen3 & model, const llm_graph_params & params);
    };

    // view 0 builds llama_model_qwen3::graph unchanged, view 1 graph_diffusion
    std::unique_ptr<llm_graph_context> build_arch_graph(const llm_graph_params & params) const override;
};
