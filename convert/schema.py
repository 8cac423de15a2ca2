"""The orthrus-qwen3 GGUF layout: key and tensor-name templates as data.

Base tensors use llama.cpp's qwen3 names. The six diffusion-view tensors of each layer
end in ``_diff``, so that llama-quantize's name-substring rules (``attn_v.weight``,
``attn_output.weight``) do not match them: they get the ftype's base type, no bumps.
"""

ARCH = "orthrus-qwen3"

# GGUF key -> (config attribute, GGUF value type). "{arch}" is replaced by ARCH.
HPARAM_KEYS = {
    "{arch}.context_length": ("max_position_embeddings", "uint32"),
    "{arch}.embedding_length": ("hidden_size", "uint32"),
    "{arch}.block_count": ("num_hidden_layers", "uint32"),
    "{arch}.feed_forward_length": ("intermediate_size", "uint32"),
    "{arch}.attention.head_count": ("num_attention_heads", "uint32"),
    "{arch}.attention.head_count_kv": ("num_key_value_heads", "uint32"),
    "{arch}.attention.key_length": ("head_dim", "uint32"),
    "{arch}.attention.value_length": ("head_dim", "uint32"),
    "{arch}.attention.layer_norm_rms_epsilon": ("rms_norm_eps", "float32"),
    "{arch}.rope.freq_base": ("rope_theta", "float32"),
    "{arch}.vocab_size": ("vocab_size", "uint32"),
    "{arch}.diffusion.block_size": ("block_size", "uint32"),
    "{arch}.diffusion.mask_token_id": ("mask_token_id", "uint32"),
}

# HF name -> GGUF name. "{bid}" is the layer index.
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",  # absent when tied
}

LAYER_TENSORS = {
    "input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "self_attn.q_norm.weight": "blk.{bid}.attn_q_norm.weight",
    "self_attn.k_norm.weight": "blk.{bid}.attn_k_norm.weight",
    "mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
    # the diffusion view
    "self_attn.q_proj_diff.weight": "blk.{bid}.attn_q_diff.weight",
    "self_attn.k_proj_diff.weight": "blk.{bid}.attn_k_diff.weight",
    "self_attn.v_proj_diff.weight": "blk.{bid}.attn_v_diff.weight",
    "self_attn.o_proj_diff.weight": "blk.{bid}.attn_output_diff.weight",
    "self_attn.q_norm_diff.weight": "blk.{bid}.attn_q_norm_diff.weight",
    "self_attn.k_norm_diff.weight": "blk.{bid}.attn_k_norm_diff.weight",
}

DIFF_SUFFIXES = tuple(k for k in LAYER_TENSORS if "_diff." in k)


def hf_layer_name(bid: int, suffix: str) -> str:
    return f"model.layers.{bid}.{suffix}"


def gguf_key(template: str) -> str:
    return template.format(arch=ARCH)
