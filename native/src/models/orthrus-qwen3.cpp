// orthrus-qwen3: Qwen3 plus a diffusion attention view (orthrus-gguf, native/README.md).
//
// The AR view (cparams.orthrus_view == 0) is llama_model_qwen3::graph, unchanged.
// The diffusion view swaps, in every layer, the attention projections and the q/k norms
// for their *_diff twins; RoPE positions, layer norms, MLP, final norm and head are shared.
// Whether the block attends causally is cparams.causal_attn, set by llama_orthrus_draft.

#include "models.h"

void llama_model_orthrus_qwen3::load_arch_hparams(llama_model_loader & ml) {
    llama_model_qwen3::load_arch_hparams(ml);

    ml.get_key(LLM_KV_ORTHRUS_BLOCK_SIZE,    block_size);
    ml.get_key(LLM_KV_ORTHRUS_MASK_TOKEN_ID, mask_token_id);
}

void llama_model_orthrus_qwen3::load_arch_tensors(llama_model_loader & ml) {
    llama_model_qwen3::load_arch_tensors(ml);

    LLAMA_LOAD_LOCALS;

    const int64_t n_embd_q = n_embd_head_k * n_head;

    diff_layers.resize(n_layer);
    for (int i = 0; i < n_layer; ++i) {
        auto & d = diff_layers[i];

        d.wq     = create_tensor(tn(LLM_TENSOR_ORTHRUS_ATTN_Q_DIFF,      "weight", i), {n_embd, n_embd_q},     0);
        d.wk     = create_tensor(tn(LLM_TENSOR_ORTHRUS_ATTN_K_DIFF,      "weight", i), {n_embd, n_embd_k_gqa}, 0);
        d.wv     = create_tensor(tn(LLM_TENSOR_ORTHRUS_ATTN_V_DIFF,      "weight", i), {n_embd, n_embd_v_gqa}, 0);
        d.wo     = create_tensor(tn(LLM_TENSOR_ORTHRUS_ATTN_OUT_DIFF,    "weight", i), {n_embd_q, n_embd},     0);
        d.q_norm = create_tensor(tn(LLM_TENSOR_ORTHRUS_ATTN_Q_NORM_DIFF, "weight", i), {n_embd_head_k},        0);
        d.k_norm = create_tensor(tn(LLM_TENSOR_ORTHRUS_ATTN_K_NORM_DIFF, "weight", i), {n_embd_head_k},        0);
    }
}

std::unique_ptr<llm_graph_context> llama_model_orthrus_qwen3::build_arch_graph(const llm_graph_params & params) const {
    if (params.cparams.orthrus_view == 1) {
        return std::make_unique<graph_diffusion>(*this, params);
    }
    return std::make_unique<llama_model_qwen3::graph>(*this, params);
}

llama_model_orthrus_qwen3::graph_diffusion::graph_diffusion(const llama_model_orthrus_qwen3 & model, const llm_graph_params & params) : llm_graph_context(params) {
    const int64_t n_embd_head = hparams.n_embd_head_v();

    GGML_ASSERT(n_embd_head == hparams.n_embd_head_k());
    GGML_ASSERT(n_embd_head == n_rot);
    GGML_ASSERT((int) model.diff_layers.size() == n_layer);

    ggml_tensor * cur;
    ggml_tensor * inpL;

    inpL = build_inp_embd(model.tok_embd);

    ggml_tensor * inp_pos = build_inp_pos();

    auto * inp_attn = build_attn_inp_kv();

    ggml_tensor * inp_out_ids = build_inp_out_ids();

    for (int il = 0; il < n_layer; ++il) {
        const auto & layer = model.layers[il];
        const auto & diff  = model.diff_layers[il];

        res->t_layer_inp[il] = inpL;

        ggml_tensor * inpSA = inpL;

        cur = build_norm(inpL, layer.attn_norm, NULL, LLM_NORM_RMS, il);
        cb(cur, "attn_norm", il);

        // self-attention with the diffusion projections and norms
        {
            ggml_tensor * Qcur = build_lora_mm(diff.wq, cur);
            ggml_tensor * Kcur = build_lora_mm(diff.wk, cur);
            ggml_tensor * Vcur = build_lora_mm(diff.wv, cur);

            Qcur = ggml_reshape_3d(ctx0, Qcur, n_embd_head, n_head,    n_tokens);
            Kcur = ggml_reshape_3d(ctx0, Kcur, n_embd_head, n_head_kv, n_tokens);
            Vcur = ggml_reshape_3d(ctx0, Vcur, n_embd_head, n_head_kv, n_tokens);

            Qcur = build_norm(Qcur, diff.q_norm, NULL, LLM_NORM_RMS, il);
            cb(Qcur, "Qcur_normed", il);

            Qcur = ggml_rope_ext(
                    ctx0, Qcur, inp_pos, nullptr,
                    n_rot, rope_type, n_ctx_orig, freq_base, freq_scale,
                    ext_factor, attn_factor, beta_fast, beta_slow
                    );

            Kcur = build_norm(Kcur, diff.k_norm, NULL, LLM_NORM_RMS, il);
            cb(Kcur, "Kcur_normed", il);

            Kcur = ggml_rope_ext(
                    ctx0, Kcur, inp_pos, nullptr,
                    n_rot, rope_type, n_ctx_orig, freq_base, freq_scale,
                    ext_factor, attn_factor, beta_fast, beta_slow
                    );

            cb(Qcur, "Qcur", il);
            cb(Kcur, "Kcur", il);
            cb(Vcur, "Vcur", il);

            cur = build_attn(inp_attn,
                    diff.wo, nullptr, nullptr,
                    Qcur, Kcur, Vcur, nullptr, nullptr, nullptr, 1.0f/sqrtf(float(n_embd_head)), il);
        }
        if (il == n_layer - 1 && inp_out_ids) {
            cur   = ggml_get_rows(ctx0,   cur, inp_out_ids);
            inpSA = ggml_get_rows(ctx0, inpSA, inp_out_ids);
        }
        ggml_tensor * ffn_inp = ggml_add(ctx0, cur, inpSA);
        cb(ffn_inp, "ffn_inp", il);

        cur = build_norm(ffn_inp, layer.ffn_norm, NULL, LLM_NORM_RMS, il);
        cb(cur, "ffn_norm", il);

        cur = build_ffn(cur,
                layer.ffn_up,   NULL, layer.ffn_up_s,
                layer.ffn_gate, NULL, layer.ffn_gate_s,
                layer.ffn_down, NULL, layer.ffn_down_s,
                NULL,
                LLM_FFN_SILU, LLM_FFN_PAR, il);
        cb(cur, "ffn_out", il);

        cur = ggml_add(ctx0, cur, ffn_inp);

        cur = build_cvec(cur, il);
        cb(cur, "l_out", il);

        inpL = cur;
    }
    cur = inpL;

    cur = build_norm(cur, model.output_norm, NULL, LLM_NORM_RMS, -1);

    cb(cur, "result_norm", -1);
    res->t_embd = cur;

    cur = build_lora_mm(model.output, cur, model.output_s);

    cb(cur, "result_output", -1);
    res->t_logits = cur;

    ggml_build_forward_expand(gf, cur);
}
