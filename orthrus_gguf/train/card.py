"""Loss-curve plots and MODEL_CARD.md of a trained orthrus-tiny, from its train_log.json."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def smooth(x: list[float], k: int = 25) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if len(x) < k:
        return x
    return np.convolve(x, np.ones(k) / k, mode="valid")


def plot(out: Path, log: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    b = log["base"]
    ax[0].plot(b["loss"], alpha=0.3, label="train (per step)")
    ax[0].plot(np.arange(len(smooth(b["loss"]))) + 12, smooth(b["loss"]), label="train (smoothed)")
    if b["eval"]:
        s, v = zip(*b["eval"])
        ax[0].plot(s, v, "o-", label="held-out stdlib files")
    ax[0].set(title="base: next-token cross-entropy", xlabel="step", ylabel="nats/token")
    h = log["heads"]
    ax[1].plot(smooth(h["loss"]), label="total (KL + CE)")
    for k in ("kl", "ce"):
        if h.get("extra", {}).get(k):
            ax[1].plot(smooth(h["extra"][k]), label=k.upper())
    ax[1].set(title="diffusion heads: distillation from the AR view", xlabel="step", ylabel="nats/row")
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)


def write_card(out: Path, log: dict, manifest: dict) -> None:
    plot(out, log)
    c, m, tk = log["config"], log["measure"], manifest["tokens"]
    gm = manifest["generated_math"]
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2 ** 20
    b, h = log["base"], log["heads"]
    rows = "\n".join(
        f"| {k} | {v['prompts']} | {v['steps']} | **{v['mean_tokens_per_step']:.2f}** | "
        f"{v['per_prompt_min']:.2f} – {v['per_prompt_max']:.2f} | {v['identical_to_ar']} |"
        for k, v in m.items())
    samples = "\n\n".join(f"**{k}** prompt:\n```\n{s['prompt'][-300:]}\n```\ngreedy output:\n```\n{s['output']}\n```"
                          for k, v in m.items() for s in v["samples"][:1])
    decay = log["plan"].get("decay", 0.0)
    row_w = f", row j weighted exp(-j/{decay:g})" if decay > 0 else ", all rows weighted equally"
    text = f"""# orthrus-tiny

A small Orthrus-Qwen3 model trained from scratch for this repository's tests, benchmarks
and demo. It has the published checkpoints' exact layout (architectures `OrthrusLM`,
`model_type` `orthrus`, `block_size` 32, `mask_token_id` = first embedding row after the
tokenizer's ids), so it goes through the same converter and runtime. It is a toy: it
completes Python standard-library-like code and worked arithmetic, nothing else.

## Model

Qwen3 decoder, {c['num_hidden_layers']} layers, hidden {c['hidden_size']},
{c['num_attention_heads']} query heads over {c['num_key_value_heads']} KV heads of {c['head_dim']},
FFN {c['intermediate_size']}, tied embeddings, vocab rows {c['vocab_size']}, trained context
{log['plan'].get('context', 256)}. Plus the Orthrus diffusion attention (`*_proj_diff`, `*_norm_diff`).
Weights bf16; folder {size:.1f} MiB.

## Data

- Code: the standard library of Python {manifest['python_version']} ({manifest['implementation']}),
  `*.py` under `{manifest['stdlib']}` excluding {', '.join(manifest['excluded_dirs'])}:
  {manifest['code_files']} files, {manifest['code_bytes']:,} bytes. The exact file list with sizes
  and sha256 is in `manifest.json`. Held out (never trained on): files with
  `{manifest['heldout_rule']}`.
- **Generated (synthetic) arithmetic**, labelled as such: {gm['documents']:,} worked problems
  (column addition, subtraction with borrows, multiplication), {gm['bytes']:,} bytes, seed {gm['seed']}.
  Example: `{gm['example']!r}`. Held-out problems never appear in training.
- Tokens (BPE of {c['vocab_size']} rows, trained on this corpus): {tk['train']:,} training tokens, of which
  {tk['generated_math']:,} ({100 * tk['generated_math_share']:.0f}%) are generated arithmetic;
  {tk['val_heldout_code']:,} held-out code tokens.

## Training ({log['hardware']}, torch {log['torch']})

{log.get('note', '')}

| stage | steps | s/step | time | final loss |
|---|---|---|---|---|
| base (next-token CE) | {b['step']} | {b['sec_per_step']:.3f} | {b['seconds'] / 60:.1f} min | {np.mean(b['loss'][-50:]):.3f} (held-out code {log['val_loss']:.3f}) |
| self-generated data | {log['plan']['selfgen']} greedy sequences | | {log.get('selfgen_seconds', 0) / 60:.1f} min | |
| diffusion heads (KL + CE to AR) | {h['step']} | {h['sec_per_step']:.3f} | {h['seconds'] / 60:.1f} min | {np.mean(h['loss'][-50:]):.3f} |

Base: AdamW (0.9, 0.95), weight decay 0.1, warmup then cosine, batch {log['plan']['base_batch']} x 256 tokens.
Heads: base frozen, `_diff` weights initialised as copies of the AR ones, block 32, single step;
{log['plan']['head_blocks']} blocks per sequence in one forward (mask: AR keys before the block start +
the block itself); {int(100 * (1 - log['plan']['corpus_frac']))}% of sequences are the base's own greedy
continuations of corpus prefixes, the rest corpus windows. Loss: KL(AR || diffusion) + {log['plan']['ce_weight']} x CE
toward the AR argmax, rows 0..30 of each block{row_w}.

![loss curves](loss_curves.png)

## Orthrus decoding: tokens per step (greedy, block 32, reference loop)

Mean over all steps of (accepted drafts + 1), `orthrus_gguf.reference.generate_orthrus` on the
exported weights in fp32, held-out prompts from `heldout_prompts.json`, up to 128 new tokens.
"Identical" counts prompts whose Orthrus output equals greedy AR token for token.

| prompts | n | steps | tokens/step | per-prompt range | identical to AR |
|---|---|---|---|---|---|
{rows}

## Samples

{samples}

## Reproduce

    python -m orthrus_gguf.train prepare --out build/prepared   # needs this Python's stdlib
    python -m orthrus_gguf.train fit --data build/prepared --out models/orthrus-tiny
    # on a CUDA box (only torch, numpy, tokenizers, safetensors, matplotlib, tqdm needed):
    PYTHONPATH=. python -m orthrus_gguf.train fit --data build/prepared --out OUT --device cuda

`fit` picks its step counts from the minutes it is given (CPU: 55 + 30, CUDA: 3 + 2.5) after
timing the first steps; checkpoints go to build/NAME-work and a rerun continues.
"""
    (out / "MODEL_CARD.md").write_text(text)
