"""Converter: round trips through gguf.GGUFReader, tokenizer keys, hub ids, bad input."""
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from orthrus_gguf.checkpoint import Checkpoint
from orthrus_gguf.convert import convert, schema
from orthrus_gguf.convert.writer import hf_to_gguf_names
from orthrus_gguf.errors import OrthrusError


def read_back(path):
    r = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items()}
    tensors = {t.name: t for t in r.tensors}
    return fields, tensors


def tensor_value(t) -> np.ndarray:
    """A GGUF tensor as float32 in the HF [out, in] shape."""
    shape = tuple(reversed(t.shape.tolist()))
    if t.tensor_type.name == "BF16":
        return torch.from_numpy(np.array(t.data).view(np.int16).copy()).view(torch.bfloat16).float().numpy().reshape(shape)
    return dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)


CASES = [dict(tied=True, shards=1), dict(tied=False, shards=1), dict(tied=True, shards=3),
         dict(tied=False, shards=2, dtype="bfloat16")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_round_trip(tiny_ckpt, tmp_path, case, outtype):
    src = tiny_ckpt(hidden=64, ffn=96, **case)
    out = convert(src, tmp_path / "m.gguf", outtype, progress=False)
    ckpt = Checkpoint(src)
    fields, tensors = read_back(out)
    names = hf_to_gguf_names(ckpt)
    assert set(tensors) == set(names.values())
    assert ("output.weight" in tensors) == (not case["tied"])
    assert sum(".attn_q_diff." in n for n in tensors) == ckpt.config.num_hidden_layers
    for hf, src_t in ckpt.tensors():
        want = src_t.float().numpy()
        got = tensor_value(tensors[names[hf]])
        assert got.shape == want.shape, hf
        if src_t.ndim == 1 or outtype == "f32" or (outtype == "bf16" and src_t.dtype == torch.bfloat16):
            np.testing.assert_array_equal(got, want, err_msg=hf)  # exact
        elif outtype == "f16":
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=hf)
        elif outtype == "bf16":
            np.testing.assert_array_equal(got, src_t.to(torch.bfloat16).float().numpy(), err_msg=hf)
        else:
            # q8_0: per block of 32, d = max|x|/127 stored as f16 and q = round(x/d) in [-127, 127]:
            # |q*d16 - x| <= d/2 + 127*|d16 - d| <= d/2 + 127*d*2^-11 < 0.57 d
            blocks = want.reshape(-1, 32)
            bound = np.abs(blocks).max(1, keepdims=True) / 127 * 0.57 + 1e-7
            assert (np.abs(got.reshape(-1, 32) - blocks) <= bound).all(), hf
    c = ckpt.config
    for key, (attr, vtype) in schema.HPARAM_KEYS.items():
        v = fields[schema.gguf_key(key)]
        assert v == pytest.approx(getattr(c, attr)), key
    assert fields["general.architecture"] == "orthrus-qwen3"
    assert fields["orthrus-qwen3.diffusion.block_size"] == c.block_size
    assert fields["orthrus-qwen3.diffusion.mask_token_id"] == c.mask_token_id


def test_tokenizer_keys(tiny_ckpt, tmp_path):
    src = tiny_ckpt()
    fields, _ = read_back(convert(src, tmp_path / "m.gguf", "f32", progress=False))
    tok = json.loads((src / "tokenizer.json").read_text())
    cfg = json.loads((src / "config.json").read_text())
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "qwen2"
    assert len(tokens) == len(types) == cfg["vocab_size"]  # padded to the embedding rows
    for text, i in tok["model"]["vocab"].items():
        assert tokens[i] == text and types[i] == 1  # NORMAL
    added = {a["content"]: a["id"] for a in tok["added_tokens"]}
    assert types[added["<|im_end|>"]] == 3 and types[added["<think>"]] == 4  # CONTROL, USER_DEFINED
    assert tokens[cfg["mask_token_id"]] == f"[PAD{cfg['mask_token_id']}]"
    assert types[cfg["mask_token_id"]] == 5  # UNUSED: the mask id is an embedding row, not a token
    assert fields["tokenizer.ggml.merges"][:3] == tok["model"]["merges"][:3] or \
        fields["tokenizer.ggml.merges"][:3] == [" ".join(m) for m in tok["model"]["merges"][:3]]
    assert fields["tokenizer.ggml.eos_token_id"] == added["<|im_end|>"]
    assert fields["tokenizer.ggml.eot_token_id"] == added["<|im_end|>"]
    assert fields["tokenizer.ggml.padding_token_id"] == added["<|endoftext|>"]
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in fields["tokenizer.chat_template"]


def test_hub_id_from_prefilled_cache(tiny_ckpt, tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache, offline."""
    cache = tmp_path / "hub"
    snap = cache / "models--someone--Orthrus-Tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_ckpt(), snap)
    (cache / "models--someone--Orthrus-Tiny" / "refs").mkdir()
    (cache / "models--someone--Orthrus-Tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    out = convert("someone/Orthrus-Tiny", tmp_path / "hub.gguf", "f16", progress=False)
    assert read_back(out)[0]["general.architecture"] == "orthrus-qwen3"
    with pytest.raises(OrthrusError, match="could not fetch"):
        convert("someone/not-cached", tmp_path / "x.gguf", "f16", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def fake_hub_cache(root, src, repo="someone/Orthrus-Tiny", refs=("main",)):
    """A huggingface_hub cache holding `repo` at each ref (one snapshot per ref)."""
    d = root / f"models--{repo.replace('/', '--')}"
    (d / "refs").mkdir(parents=True, exist_ok=True)
    for i, ref in enumerate(refs):
        commit = f"{i + 1:x}" * 40
        shutil.copytree(src, d / "snapshots" / commit)
        (d / "refs" / ref).write_text(commit)
    return root


def test_hub_id_names_the_output_and_metadata_after_the_repo(tiny_ckpt, tmp_path, monkeypatch):
    """A hub id's GGUF is NAME-TYPE.gguf and general.name is the repo's name (not the
    snapshot's commit hash); --cache-dir and --revision pick the snapshot, offline."""
    cache = fake_hub_cache(tmp_path / "hub", tiny_ckpt(), refs=("main", "v2"))
    v2 = next((cache / "models--someone--Orthrus-Tiny" / "snapshots").glob("2*"))
    cfg = json.loads((v2 / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5  # something that tells the revisions apart
    (v2 / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    out = convert("someone/Orthrus-Tiny", outtype="f16", progress=False, cache_dir=cache)
    assert out == Path("Orthrus-Tiny-F16.gguf") and out.is_file()
    fields = read_back(out)[0]
    assert fields["general.name"] == "Orthrus-Tiny" and fields["general.organization"] == "someone"
    assert fields["general.source.repo_url"] == "https://huggingface.co/someone/Orthrus-Tiny"
    out2 = convert("someone/Orthrus-Tiny", tmp_path / "v2.gguf", "f16", progress=False, cache_dir=cache,
                   revision="v2")
    assert read_back(out2)[0]["orthrus-qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert read_back(out)[0]["orthrus-qwen3.attention.layer_norm_rms_epsilon"] != pytest.approx(1e-5)
    with pytest.raises(OrthrusError, match="at revision 'v3': could not fetch"):
        convert("someone/Orthrus-Tiny", tmp_path / "v3.gguf", "f16", progress=False, cache_dir=cache, revision="v3")
    with pytest.raises(OrthrusError, match="--revision applies to hub ids"):
        convert(tiny_ckpt(), tmp_path / "l.gguf", "f16", progress=False, revision="v2")
    # a local directory: its own name, the type in capitals; auto keeps the checkpoint's type
    assert json.loads((tiny_ckpt() / "config.json").read_text())["torch_dtype"] == "float32"
    local = convert(tiny_ckpt(), outtype="auto", progress=False)
    assert local.name == f"{tiny_ckpt().resolve().name}-F32.gguf"
    assert read_back(local)[1]["token_embd.weight"].tensor_type.name == "F32"
    assert read_back(local)[0]["general.name"] == tiny_ckpt().resolve().name


def test_token_and_revision_reach_huggingface_hub(tiny_ckpt, tmp_path, monkeypatch):
    """--token / --revision / --cache-dir are handed to snapshot_download as given."""
    seen = {}

    def fake(**kw):
        seen.update(kw)
        return str(tiny_ckpt())
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    from orthrus_gguf.cli import main
    from click.testing import CliRunner
    r = CliRunner().invoke(main, ["convert", "someone/Private-Model", "--token", "hf_x", "--revision", "abc",
                                  "--cache-dir", str(tmp_path / "c"), "--outfile", str(tmp_path / "p.gguf")])
    assert r.exit_code == 0, r.output
    assert seen["repo_id"] == "someone/Private-Model" and seen["token"] == "hf_x"
    assert seen["revision"] == "abc" and seen["cache_dir"] == str(tmp_path / "c")
    assert read_back(tmp_path / "p.gguf")[0]["general.name"] == "Private-Model"


def test_peak_memory_is_about_one_tensor(tiny_ckpt, tmp_path):
    """Tensors are read and written one at a time: the reader never holds two at once."""
    src = tiny_ckpt()
    ckpt = Checkpoint(src)
    alive = []
    import weakref
    gen = ckpt.tensors()
    for _, t in gen:
        alive = [r for r in alive if r() is not None]
        assert len(alive) == 0
        alive.append(weakref.ref(t))
        del t


# ---- bad input: a clear error, a non-zero exit, and no file left behind

def edit_config(src, tmp_path, **changes):
    dst = tmp_path / "edited"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def edit_tensors(src, tmp_path, fn):
    from safetensors.torch import load_file, save_file
    dst = tmp_path / "edited"
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    fn(sd)
    save_file(sd, str(dst / "model.safetensors"))
    return dst


def make_bad(kind, src, tmp_path):
    if kind == "not_a_dir":
        p = tmp_path / "file.txt"
        p.write_text("x")
        return p
    if kind == "no_such_path":
        return tmp_path / "nope"
    if kind == "no_config":
        dst = tmp_path / "edited"
        shutil.copytree(src, dst)
        (dst / "config.json").unlink()
        return dst
    if kind == "plain_qwen3":
        return edit_tensors(src, tmp_path, lambda sd: [sd.pop(k) for k in list(sd) if "_diff." in k])
    if kind == "missing_tensor":
        return edit_tensors(src, tmp_path, lambda sd: sd.pop("model.layers.1.self_attn.k_proj_diff.weight"))
    if kind == "extra_tensor":
        return edit_tensors(src, tmp_path, lambda sd: sd.update({"model.layers.0.self_attn.extra.weight": torch.zeros(3)}))
    if kind == "wrong_shape":
        return edit_tensors(src, tmp_path, lambda sd: sd.update(
            {"model.layers.0.self_attn.q_proj_diff.weight": torch.zeros(8, 64)}))
    if kind == "truncated":
        dst = tmp_path / "edited"
        shutil.copytree(src, dst)
        f = dst / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-1000])
        return dst
    if kind == "unknown_dtype":
        return edit_config(src, tmp_path, torch_dtype="float8", dtype="float8")
    if kind == "int_tensor":
        return edit_tensors(src, tmp_path, lambda sd: sd.update(
            {"model.norm.weight": sd["model.norm.weight"].to(torch.int32)}))
    if kind == "no_block_size":
        return edit_config(src, tmp_path, block_size=None)
    if kind == "block_size_range":
        return edit_config(src, tmp_path, block_size=1)
    if kind == "no_mask":
        return edit_config(src, tmp_path, mask_token_id=None)
    if kind == "mask_range":
        return edit_config(src, tmp_path, mask_token_id=512)
    if kind in ("rope_theta", "eps_text", "max_pos"):
        return edit_config(src, tmp_path, **{"rope_theta": dict(rope_theta=0.0), "eps_text": dict(rms_norm_eps="tiny"),
                                             "max_pos": dict(max_position_embeddings=-5)}[kind])
    if kind in ("config_list", "index_not_json", "tokenizer_not_json"):
        dst = tmp_path / "edited"
        shutil.copytree(src, dst)
        name = {"config_list": "config.json", "index_not_json": "model.safetensors.index.json",
                "tokenizer_not_json": "tokenizer.json"}[kind]
        (dst / name).write_text("[1, 2]" if kind == "config_list" else "{not json")
        return dst
    if kind in ("shard_outside", "header_list", "header_no_offsets"):
        dst = tmp_path / "edited"
        shutil.copytree(src, dst)
        if kind == "shard_outside":
            (tmp_path / "secret.safetensors").write_bytes((dst / "model.safetensors").read_bytes())
            names = json.loads(json.dumps(list(Checkpoint(src).table)))
            (dst / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {n: "../secret.safetensors" for n in names}}))
        else:
            f = dst / "model.safetensors"
            raw = f.read_bytes()
            (n,) = struct.unpack("<Q", raw[:8])
            header = json.loads(raw[8:8 + n])
            if kind == "header_list":
                new = json.dumps(list(header)).encode()
            else:
                name = next(k for k in header if k != "__metadata__")
                del header[name]["data_offsets"]
                new = json.dumps(header).encode()
            new = new.ljust(n, b" ") if len(new) <= n else new
            f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
        return dst
    raise AssertionError(kind)


BAD = {
    "not_a_dir": "not a directory",
    "no_such_path": "no such directory",
    "no_config": "config.json",
    "plain_qwen3": "plain Qwen3",
    "missing_tensor": r"missing: model.layers.1.self_attn.k_proj_diff.weight",
    "extra_tensor": r"unexpected tensor\(s\): model.layers.0.self_attn.extra.weight",
    "wrong_shape": r"q_proj_diff.weight has shape \[8, 64\], expected \[64, 64\]",
    "truncated": "truncated",
    "unknown_dtype": "unknown dtype 'float8'",
    "int_tensor": "unsupported dtype I32",
    "no_block_size": "missing key.*block_size",
    "block_size_range": "block_size must be an integer in",
    "no_mask": "missing key.*mask_token_id",
    "mask_range": r"mask_token_id must be in \[0, vocab_size=512\), got 512",
    "rope_theta": "rope_theta must be a positive number, got 0.0",
    "eps_text": "rms_norm_eps must be a positive number, got 'tiny'",
    "max_pos": "max_position_embeddings must be a positive integer, got -5",
    "config_list": "expected a JSON object of model settings, got a JSON list",
    "index_not_json": "model.safetensors.index.json.*not valid JSON",
    "tokenizer_not_json": "tokenizer.json.*not valid JSON",
    "shard_outside": r"lists shard '../secret.safetensors', outside the checkpoint directory",
    "header_list": r"corrupt safetensors header \(a JSON list",
    "header_no_offsets": r"corrupt safetensors header entry for .* \(needs dtype, shape and data_offsets\)",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input(kind, tiny_ckpt, tmp_path):
    bad = make_bad(kind, tiny_ckpt(), tmp_path)
    out = tmp_path / "out" / "m.gguf"
    with pytest.raises(OrthrusError, match=BAD[kind]):
        convert(str(bad), out, "f16", progress=False)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_cli_bad_input_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "orthrus_gguf.cli", "convert", str(tmp_path / "nope"),
                        "-o", str(tmp_path / "m.gguf")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "error:" in r.stderr and "no such directory" in r.stderr
    assert not (tmp_path / "m.gguf").exists()


def test_output_exists_needs_force(tiny_ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(OrthrusError, match="already exists; pass --force"):
        convert(tiny_ckpt(), out, "f16", progress=False)
    assert out.read_bytes() == b"keep me"
    convert(tiny_ckpt(), out, "f16", force=True, progress=False)
    assert out.read_bytes()[:4] == b"GGUF"


def test_interrupted_write_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    from gguf import GGUFWriter
    calls = {"n": 0}
    real = GGUFWriter.write_tensor_data

    def interrupt(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, *a, **kw)
    monkeypatch.setattr(GGUFWriter, "write_tensor_data", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_ckpt(), tmp_path / "m.gguf", "f16", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unknown_outtype(tiny_ckpt, tmp_path):
    with pytest.raises(OrthrusError, match="unknown --outtype 'q3_zz'"):
        convert(tiny_ckpt(), tmp_path / "m.gguf", "q3_zz", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_info(tiny_ckpt, tmp_path):
    out = convert(tiny_ckpt(tied=False), tmp_path / "m.gguf", "q8_0", progress=False)
    r = subprocess.run([sys.executable, "-m", "orthrus_gguf.cli", "info", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "orthrus-qwen3" in r.stdout and "diffusion.block_size: 8" in r.stdout
    assert "diffusion.mask_token_id: 305" in r.stdout and "Q8_0 x" in r.stdout and "F32 x" in r.stdout
    assert f"tensor_count: {2 + 1 + 2 * 17}" in r.stdout
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    r = subprocess.run([sys.executable, "-m", "orthrus_gguf.cli", "info", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "not a GGUF file" in r.stderr
