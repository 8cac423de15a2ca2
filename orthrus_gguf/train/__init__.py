"""Training orthrus-tiny: corpus, tokenizer, base model, diffusion heads (`python -m orthrus_gguf.train`)."""
