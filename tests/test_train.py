"""The orthrus-tiny recipe on a toy corpus and model: every stage runs, losses fall, the
export is a valid Orthrus checkpoint, and greedy Orthrus decoding on it equals greedy AR."""
from __future__ import annotations

import inspect
import json
import re

import numpy as np
import pytest
import torch

from orthrus_gguf.reference import KVCache, OrthrusModel, generate_ar, generate_orthrus
from orthrus_gguf.tokenizer import train_bpe
from orthrus_gguf.train import base, corpus, heads, loop, ops
from orthrus_gguf.train.fit import export
from orthrus_gguf.train.prepare import encode_stream

TOY = dict(n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn=192)
BLOCK, CONTEXT = 8, 48


@pytest.fixture(scope="module")
def toy():
    """A toy corpus (two stdlib modules + generated arithmetic), its BPE and token stream."""
    import json.decoder
    import string
    math_docs, held = corpus.math_corpus(300)
    docs = [inspect.getsource(string), inspect.getsource(json.decoder)] + math_docs
    tok = train_bpe(docs, 400)
    n_tokens = tok.token_to_id("<|endoftext|>")
    data = encode_stream(tok, docs, n_tokens)
    cfg = base.model_config(n_tokens, 512, block_size=BLOCK, context=CONTEXT, dtype="float32", **TOY)
    return {"tok": tok, "data": data, "cfg": cfg, "held": held}


def mean(x):
    return float(np.mean(x))


def test_arithmetic_is_worked_correctly_and_heldout_is_disjoint():
    for a, b in [(37, 48), (999, 1), (5021, 987)]:
        assert solve_result(corpus.solve_add(a, b)) == a + b
        assert solve_result(corpus.solve_sub(max(a, b), min(a, b))) == abs(a - b)
    for a, b in [(47, 6), (999, 9), (47, 36)]:
        assert solve_result(corpus.solve_mul(a, b)) == a * b
    assert "7 + 8 = 15, write 5 carry 1." in corpus.solve_add(37, 48)
    train, held = corpus.math_corpus(500)
    asked = {re.match(r"Q: (.*) = \?", d).group(1) for d in train}
    assert held and not asked & set(held)


def solve_result(text: str) -> int:
    return int(re.search(r"= (\d+)\.$", text).group(1))


def test_code_prompt_ends_with_a_def_line():
    src = inspect.getsource(corpus)
    ps = corpus.code_prompts(src)
    assert len(ps) == 2
    for p in ps:
        assert p.splitlines()[-1].lstrip().startswith("def ") and p.endswith(":\n")
        assert p in src and len(p) < 500


def test_batched_views_match_the_reference(toy):
    """ops.ar_forward / diffusion_forward (many blocks, one forward) = the reference per block."""
    m = base.init_model(toy["cfg"]).eval()
    with torch.no_grad():
        for layer in m.model.layers:  # make the two views differ
            layer.self_attn.q_proj_diff.weight.mul_(1.5)
        ids = torch.from_numpy(toy["data"][:2 * 40].astype(np.int64)).view(2, 40)
        logits, kvs = ops.ar_forward(m, ids)
        starts = torch.tensor([1, 9, 30])
        d = ops.diffusion_forward(m, ids, starts, kvs)
        for n in range(2):
            torch.testing.assert_close(logits[n], m.forward_ar(ids[n]), atol=1e-4, rtol=1e-4)
            for k, p in enumerate(starts.tolist()):
                cache = KVCache()
                m.forward_ar(ids[n, :p], cache)
                blk = torch.tensor([int(ids[n, p])] + [m.config.mask_token_id] * (BLOCK - 1))
                torch.testing.assert_close(d[n, k], m.forward_diffusion(blk, cache), atol=1e-4, rtol=1e-4)
        g = ops.greedy_continue(m, ids[:1, :5], 6)
        assert g[0, 5:].tolist() == generate_ar(m, ids[0, :5].tolist(), 6).tokens


def test_stages_train_export_and_decode_losslessly(toy, tmp_path):
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    m = base.init_model(toy["cfg"])
    hb = loop.run(base.base_stage(m, toy["data"], toy["data"], cpu, batch=8, steps=30, minutes=None,
                                  lr=3e-3, context=CONTEXT), tmp_path / "base.pt")
    assert mean(hb["loss"][-5:]) < mean(hb["loss"][:5]) - 0.5

    m.eval()
    sg = heads.self_generate(m, toy["data"], 8, CONTEXT, cpu, batch=8, max_prefix=16)
    assert sg.shape == (8, CONTEXT)
    frozen = {k: v.clone() for k, v in m.state_dict().items() if "_diff" not in k}
    hh = loop.run(heads.heads_stage(m, sg, toy["data"], cpu, batch=4, blocks=3, steps=20, minutes=None,
                                    lr=3e-3), tmp_path / "heads.pt")
    assert mean(hh["loss"][-5:]) < mean(hh["loss"][:5])
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in frozen.items()), "the base must stay frozen"

    out = tmp_path / "orthrus-tiny"
    data = tmp_path / "data"
    data.mkdir()
    (data / "heldout_prompts.json").write_text(json.dumps({"code": [], "math": []}))
    (data / "manifest.json").write_text("{}")
    export(m, toy["cfg"], toy["tok"], data, out)

    from orthrus_gguf.checkpoint import Checkpoint
    ck = Checkpoint(out)
    assert ck.config.block_size == BLOCK and ck.config.mask_token_id == toy["tok"].get_vocab_size()
    model = OrthrusModel.from_pretrained(out)
    eos = [toy["tok"].token_to_id("<|endoftext|>")]
    for prompt in [corpus.math_text(q) for q in toy["held"][:2]] + ["def __init__(self"]:
        ids = toy["tok"].encode(prompt).ids
        ar = generate_ar(model, ids, 24, eos)
        # The comparison is exact because the AR path has no near-ties (checked, not assumed).
        assert min_margin(model, ids, ar.tokens) > 1e-3
        assert generate_orthrus(model, ids, 24, eos).tokens == ar.tokens


def min_margin(model: OrthrusModel, prompt: list[int], out: list[int]) -> float:
    """Smallest top-1 minus top-2 logit along a greedy path."""
    logits = model.forward_ar(torch.tensor(prompt + out[:-1]))[len(prompt) - 1:]
    top = logits.topk(2, -1).values
    return float((top[:, 0] - top[:, 1]).min())


def test_interrupted_stage_resumes(tmp_path):
    w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    calls = []

    def loss(step):
        if step == 3 and not calls:
            calls.append(step)
            raise KeyboardInterrupt
        return (w ** 2).sum()

    stage = loop.Stage("toy", {"w": w}, loss, steps=6, lr=0.1, warmup=1, save_every=100)
    with pytest.raises(SystemExit):
        loop.run(stage, tmp_path / "toy.pt")
    saved = torch.load(tmp_path / "toy.pt", weights_only=False)
    assert saved["hist"]["step"] == 3
    hist = loop.run(stage, tmp_path / "toy.pt")
    assert hist["step"] == 6 and len(hist["loss"]) == 6
