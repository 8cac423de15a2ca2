"""Misuse of a model object never costs a crash: use after close and use from two threads
end in a clear OrthrusError (issue "bad input and faults")."""
import os
import threading

import pytest

from orthrus_gguf import Orthrus, OrthrusError


@pytest.fixture
def path(tiny_gguf):
    return tiny_gguf("f32", tied=False)


def test_every_call_after_close_is_a_clear_error(path):
    m = Orthrus(path, n_ctx=256, n_threads=1)
    stream = m.steps("def f(x):", max_tokens=8)
    next(stream)
    m.close()
    calls = [lambda: m.generate("hi", max_tokens=4), lambda: list(m.stream("hi", max_tokens=4)),
             lambda: m.tokenize("hi"), lambda: m.detokenize([1, 2]), lambda: m.token_bytes(3),
             lambda: m.is_eog(3), lambda: m.apply_chat_template([{"role": "user", "content": "x"}]),
             lambda: m("hi", max_tokens=2), lambda: m.create_chat_completion([{"role": "user", "content": "x"}]),
             lambda: m.reset(), lambda: m.calibrate(), lambda: next(stream), lambda: m.native.logits(1)]
    for call in calls:
        with pytest.raises(OrthrusError, match="the model is closed"):
            call()
    m.close()  # twice is fine
    with Orthrus(path, n_ctx=256, n_threads=1) as m2:
        pass
    with pytest.raises(OrthrusError, match="the model is closed"):
        m2.generate("hi", max_tokens=2)


def test_two_threads_on_one_object_get_an_error_not_a_crash(path):
    """Four threads generate on one object at once: each call either completes with the
    single-threaded result or raises the 'another thread' error; no call returns other text."""
    with Orthrus(path, n_ctx=512, n_threads=1, exact="all") as m:  # cached = fresh (test_api)
        want = {p: m.generate(p, max_tokens=24).tokens for p in ("def f(x):", "import os", "class A:")}
        results, errors = [], []

        def work(i):
            for k in range(6):
                p = list(want)[(i + k) % 3]
                try:
                    results.append((p, m.generate(p, max_tokens=24).tokens))
                except OrthrusError as e:
                    errors.append(str(e))
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(toks == want[p] for p, toks in results)
        assert all("in use by another thread" in e or "another generation ran" in e for e in errors), set(errors)
        assert len(results) + len(errors) == 24 and results
        assert m.generate("def f(x):", max_tokens=24).tokens == want["def f(x):"]  # still usable


def test_a_call_while_another_thread_holds_the_model_is_refused(path):
    """Deterministically: while this thread is inside the model, another thread's calls
    (a generation, a tokenize, close) are refused at once instead of racing in C."""
    with Orthrus(path, n_ctx=256, n_threads=1) as m:
        seen = []

        def other():
            for call in (lambda: m.generate("hi", max_tokens=2), lambda: m.tokenize("hi"), m.close):
                try:
                    call()
                    seen.append("ran")
                except OrthrusError as e:
                    seen.append(str(e))
        with m.native.exclusive():
            t = threading.Thread(target=other)
            t.start()
            t.join()
        assert len(seen) == 3 and all("another thread" in s for s in seen), seen
        assert m.generate("hi", max_tokens=2).tokens  # and once released, it works


@pytest.mark.parametrize("key,value,msg", [
    ("block_size", 0, r"block_size is 0, not in \[2, 256\]"),
    ("block_size", 1, r"block_size is 1, not in \[2, 256\]"),
    ("block_size", 2**32 - 1, r"block_size is 4294967295, not in \[2, 256\]"),
    ("mask_token_id", 10**6, r"mask_token_id is 1000000, not a token of the vocabulary \[0, 512\)"),
])
def test_a_gguf_with_impossible_diffusion_keys_is_refused_at_load(path, tmp_path, key, value, msg):
    """Damaged diffusion keys are named at load (API) and before llama-server starts (serve),
    not by the first draft (or never: block 1)."""
    import shutil

    from gguf import GGUFReader
    bad = tmp_path / "bad.gguf"
    shutil.copy(path, bad)
    f = GGUFReader(bad, "r+").fields[f"orthrus-qwen3.diffusion.{key}"]
    f.parts[f.data[0]][0] = value
    del f
    with pytest.raises(OrthrusError, match=msg + ".*convert the checkpoint again"):
        Orthrus(bad, n_ctx=256)
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "orthrus_gguf.cli", "serve", "-m", str(bad), "--port", "18999"],
                       capture_output=True, text=True, timeout=120)  # serve says it before starting anything
    assert r.returncode == 2 and "convert the checkpoint again" in r.stderr, r.stderr[-500:]


def test_a_tiny_context_still_drafts():
    """n_ctx=16: llama.cpp makes the context 256 cells but kept the batches at 16, so the
    first draft of a 32-token block failed; Orthrus now asks for 256 and drafts."""
    from orthrus_gguf.demo import converted, embedded_model
    with Orthrus(converted(embedded_model(), "f16"), n_ctx=16, n_threads=1) as m:
        assert m.native.n_ctx == 256 and m.native.n_ubatch >= 32
        r = m.generate("Q: 1 + 1 = ?", max_tokens=12)
        assert r.stats["steps_detail"][0]["block"] == 11  # a block of the 11 tokens left


@pytest.mark.parametrize("directory", [False, True])
def test_a_signal_right_after_a_temporary_is_made_leaves_nothing(tmp_path, monkeypatch, directory):
    """The temporaries of convert and quantize (errors.temporary_beside): a stop signal that
    lands right after the file or folder is created, before any code could take charge of it,
    still leaves the folder empty (with tempfile.mkstemp / mkdtemp it stayed: a flaky
    test_a_signal_during_convert_leaves_nothing_behind found it)."""
    from pathlib import Path

    from orthrus_gguf.errors import Signalled, temporary_beside
    real_open, real_mkdir = os.open, Path.mkdir

    def open_then_signal(*a, **k):
        os.close(real_open(*a, **k))
        raise Signalled(15)

    def mkdir_then_signal(self, *a, **k):
        real_mkdir(self, *a, **k)
        raise Signalled(15)
    if directory:
        monkeypatch.setattr(Path, "mkdir", mkdir_then_signal)
    else:
        monkeypatch.setattr(os, "open", open_then_signal)
    with pytest.raises(Signalled):
        with temporary_beside(tmp_path, ".t-", directory=directory):
            pass
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    with temporary_beside(tmp_path, ".t-", directory=directory) as made:  # and in normal use
        assert made.is_dir() if directory else made.is_file()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_signal_during_convert_leaves_nothing_behind(tmp_path, sig):
    """SIGTERM / SIGHUP while converting (and quantizing) the embedded model: exit 128+signal,
    and the output folder holds no partial GGUF and no temporary folder."""
    import signal
    import subprocess
    import sys
    import time

    from orthrus_gguf.demo import embedded_model
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "orthrus_gguf.cli", "convert", str(embedded_model()),
                             "--outtype", "q4_k_m", "-o", str(out / "m.gguf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(p.name.startswith(".") for p in out.iterdir()):  # the temporary exists: mid-work
        assert proc.poll() is None and time.time() < deadline, "convert ended before it could be stopped"
        time.sleep(0.005)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + getattr(signal, sig), err
    assert f"stopped by signal {int(getattr(signal, sig))}" in err
    assert list(out.iterdir()) == []


def test_a_signal_inside_the_tensor_reader_is_an_interruption_not_a_corrupt_file(tiny_ckpt, monkeypatch):
    """Ctrl-C that lands inside safetensors' reader can come back as the reader's own error;
    the CLI's handler notes the signal, so the read reports an interruption (exit 130), not
    a corrupt checkpoint (exit 2). A real read error stays an OrthrusError."""
    import os
    import signal

    import safetensors

    from orthrus_gguf import errors
    from orthrus_gguf.checkpoint import Checkpoint
    ck = Checkpoint(tiny_ckpt())

    class Reader:
        def __init__(self, fail):
            self.fail = fail

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def get_tensor(self, name):
            if self.fail == "signal":
                try:
                    os.kill(os.getpid(), signal.SIGINT)  # the handler runs inside the "library"
                except KeyboardInterrupt:
                    pass
            raise RuntimeError("reader failed")  # ... which wraps it in its own error

    old = signal.signal(signal.SIGINT, errors.raise_signal)
    try:
        monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: Reader("error"))
        with pytest.raises(errors.OrthrusError, match="cannot read"):
            next(ck.tensors())
        monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: Reader("signal"))
        with pytest.raises(KeyboardInterrupt) as e:
            next(ck.tensors())
        assert getattr(e.value, "signum", None) == signal.SIGINT
    finally:
        signal.signal(signal.SIGINT, old)
        errors._signalled.clear()


def test_a_full_disk_while_writing_is_an_error_and_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    """The disk fills up (ENOSPC) halfway through the tensor data: an OrthrusError naming the
    cause, and the output folder as it was (no .part file). Read-only folders and quotas
    end the same way; this is the one a root test process can provoke."""
    import errno

    from gguf import GGUFWriter

    from orthrus_gguf.convert import convert
    from orthrus_gguf.errors import OrthrusError
    calls = {"n": 0}
    real = GGUFWriter.write_tensor_data

    def write(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *a, **k)
    monkeypatch.setattr(GGUFWriter, "write_tensor_data", write)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OrthrusError, match="writing failed .No space left on device.; check the free space"):
        convert(tiny_ckpt(), out / "m.gguf", "f16", progress=False)
    assert calls["n"] == 3 and list(out.iterdir()) == []


def test_converted_files_take_the_umask(tiny_ckpt, tmp_path):
    import os

    from orthrus_gguf.convert import convert
    old = os.umask(0o022)
    try:
        for t in ("f16", "q8_0"):
            p = convert(tiny_ckpt(), tmp_path / f"m-{t}.gguf", t, progress=False)
            assert p.stat().st_mode & 0o777 == 0o644, t
    finally:
        os.umask(old)


def test_cli_refuses_contradictions_before_any_work(tmp_path, tiny_gguf):
    import json
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "orthrus_gguf.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=120)
    r = cli("build", "--cuda", "--vulkan")
    assert r.returncode == 2 and "one backend per build: got --cuda --vulkan" in r.stderr
    r = cli("build", "--jobs", "-1")
    assert r.returncode == 2 and "-1 is not in the range x>=1" in r.stderr
    empty = tmp_path / "p.json"
    empty.write_text(json.dumps([]))
    r = cli("bench", "-m", tiny_gguf("f32", tied=False), "--prompts", empty)
    assert r.returncode == 2 and "holds no prompts" in r.stderr and "Traceback" not in r.stderr


HOSTILE = [None, -1, 0, 1, 2**31, 2**64, 2.5, float("nan"), float("inf"), "x", "", [], {}, b"x", True,
           [1, "a"], {"a": 1}]


def test_fuzz_api_arguments_never_escape_as_anything_but_orthrus_error(path):
    """Every generation argument, the prompt, chat messages and constructor arguments get each
    hostile value: the call works or raises OrthrusError (a message, exit 2 in the CLI), never a
    TypeError/ValueError/OverflowError from inside, never a crash."""
    escaped = []

    def attempt(what, fn):
        try:
            fn()
        except OrthrusError:
            pass
        except Exception as e:  # noqa: BLE001 - the point: nothing else may escape
            escaped.append(f"{what}: {type(e).__name__}: {e}")
    with Orthrus(path, n_ctx=256, n_threads=1) as m:
        for k in ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "frequency_penalty",
                  "presence_penalty", "penalty_last_n", "logit_bias", "seed", "rule", "stop", "mode", "block_size",
                  "logprobs", "grammar"):
            for v in HOSTILE:
                attempt(f"{k}={v!r}", lambda: m.generate("ab", **{"max_tokens": 2} | {k: v}))
        for v in HOSTILE + [[-1], [2**40], [0.5], b"\xff\xfe", 5]:
            attempt(f"prompt={v!r}", lambda: m.generate(v, max_tokens=2))
        for v in HOSTILE + [[{"role": 1}], [{"content": "x"}], [{"role": "user", "content": 5}], "hi",
                            [{"role": "user"}], [{"role": "user", "content": "\udcff"}]]:
            attempt(f"messages={v!r}", lambda: m.create_chat_completion(v, max_tokens=2))
        # text that has no UTF-8 form, token ids outside the vocabulary or not ints at all (an
        # id out of range used to abort the process inside llama.cpp's C++)
        for v in HOSTILE + [99999, -1, 2**40, "\udcff", [1.5], [True], 5]:
            for call in ("tokenize", "detokenize", "token_bytes", "is_eog"):
                attempt(f"{call}({v!r})", lambda: getattr(m, call)(v))
            attempt(f"detokenize([{v!r}])", lambda: m.detokenize([v]))
        for k, v in (("prompt", "\udcff"), ("grammar", "\udcff"), ("logit_bias", {2**70: 1.0})):
            attempt(f"{k}={v!r}", lambda: m.generate(**{"prompt": "ab", "max_tokens": 2} | {k: v}))
        for v in HOSTILE:  # mode="ar" checks its block size too
            attempt(f"mode='ar', block_size={v!r}", lambda: m.generate("ab", max_tokens=2, mode="ar", block_size=v))
        assert m.generate("ab", max_tokens=4).tokens  # still usable after all of it
    for k in ("n_ctx", "n_batch", "n_ubatch", "n_threads", "n_gpu_layers", "block_size", "exact", "type_k", "seed",
              "flash_attn", "rpc_servers", "verbose", "backend_sampling"):
        for v in HOSTILE:
            if k == "verbose" and v is True:
                continue  # valid, and it would leave llama.cpp's log on for the other tests
            attempt(f"Orthrus({k}={v!r})", lambda: Orthrus(path, **{"n_ctx": 256} | {k: v}).close())
    for v in HOSTILE + [b"/x.gguf", path.parent]:  # the model path itself
        attempt(f"Orthrus({v!r})", lambda: Orthrus(v, n_ctx=256).close())
    assert not escaped, "\n".join(escaped)
    # and the errors say what is wrong
    with Orthrus(path, n_ctx=256, n_threads=1) as m:
        for call, msg in ((lambda: m.detokenize([99999]), r"token id 99999 is outside the vocabulary \[0, "),
                          (lambda: m.token_bytes(True), "a token id must be an int, got bool"),
                          (lambda: m.tokenize("a\udcffb"), "the text to tokenize is not valid Unicode: '\\\\udcff' at character 1"),
                          (lambda: m.generate([1, 2.5], max_tokens=2), "a token id must be an int, got float"),
                          (lambda: m.generate("ab", max_tokens=2, mode="ar", block_size=0), r"block_size must be an integer in \[2, "),
                          (lambda: m.create_chat_completion([{"role": "user"}]), "messages must be a list of")):
            with pytest.raises(OrthrusError, match=msg):
                call()
    for kw, msg in ((dict(flash_attn="yes"), "flash_attn must be True, False or None"),
                    (dict(flash_attn=False, type_v="q4_0"), "a quantized V cache .* needs flash attention"),
                    (dict(rpc_servers=5), "rpc_servers must be"), (dict(verbose="no"), "verbose must be True or False")):
        with pytest.raises(OrthrusError, match=msg):
            Orthrus(path, n_ctx=256, **kw)
    from orthrus_gguf.native import NativeModel
    with pytest.raises(OrthrusError, match="op_offload must be True, False or None"):
        NativeModel(path, n_ctx=256, op_offload="no")
    with pytest.raises(OrthrusError, match="is a directory, not a GGUF file"):
        Orthrus(path.parent)


@pytest.mark.parametrize("outtype", ["f16", "q4_k_m"])
def test_an_output_folder_that_cannot_exist_is_an_error(tiny_ckpt, tmp_path, outtype):
    from orthrus_gguf.convert import convert
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OrthrusError, match="cannot create its folder.*pick another output path"):
        convert(tiny_ckpt(), blocker / "sub" / "m.gguf", outtype, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


FUZZ_WORKER = """
import json, random, sys
from pathlib import Path
from orthrus_gguf import Orthrus, OrthrusError
from orthrus_gguf.convert import convert
kind, out = sys.argv[1], Path(sys.argv[2])
for f in sorted(out.glob("m*")):
    print(f.name, end=" ", flush=True)
    try:
        if kind == "gguf":
            with Orthrus(f, n_ctx=256, n_threads=1) as m:
                m.generate([5, 6, 7], max_tokens=4)
        else:
            convert(f, out / (f.name + ".gguf"), "f16", progress=False)
        print("ok", flush=True)
    except OrthrusError as e:
        print("error", flush=True)
"""


def test_fuzz_mutated_gguf_headers_and_configs(path, tiny_ckpt, tmp_path):
    """Seeded, bounded: 60 GGUFs with 1-8 random bytes of their header and metadata changed,
    loaded and decoded; 40 checkpoints whose config.json values are replaced by hostile ones,
    converted. Every outcome is a success or an OrthrusError, in a worker whose exit code
    shows that no signal (an llama.cpp abort, a segfault) ended it."""
    import json
    import random
    import shutil
    import subprocess
    import sys

    from gguf import GGUFReader
    rng = random.Random(1234)
    raw = path.read_bytes()
    header = GGUFReader(path).data_offset
    g = tmp_path / "gguf"
    g.mkdir()
    for i in range(60):
        b = bytearray(raw)
        for _ in range(rng.choice([1, 2, 4, 8])):
            b[rng.randrange(4, header)] = rng.randrange(256)
        (g / f"m{i:02d}.gguf").write_bytes(bytes(b))
    c = tmp_path / "cfg"
    c.mkdir()
    base = json.loads((tiny_ckpt() / "config.json").read_text())
    for i in range(40):
        d = c / f"m{i:02d}"
        shutil.copytree(tiny_ckpt(), d)
        cfg = dict(base)
        for k in rng.sample(sorted(cfg), rng.choice([1, 2, 3])):
            cfg[k] = rng.choice(HOSTILE[:5] + HOSTILE[6:11] + [-(2**40), 10**9, "7", [3]])
        (d / "config.json").write_text(json.dumps(cfg, allow_nan=True))
    for kind, folder, n in (("gguf", g, 60), ("cfg", c, 40)):
        r = subprocess.run([sys.executable, "-c", FUZZ_WORKER, kind, str(folder)], capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"{kind}: the worker died ({r.returncode}) after {r.stdout.split()[-1:]}\n{r.stderr[-1500:]}"
        outcomes = r.stdout.split()[1::2]
        assert len(outcomes) == n and set(outcomes) <= {"ok", "error"}, r.stdout
        assert "error" in outcomes  # the mutations did break something: the test has teeth


def test_the_crash_classes_leave_the_process_alive(path):
    """The two classes that used to kill the process (a call after close, two threads on one
    object), run in a subprocess: it must exit 0 having seen only OrthrusErrors."""
    import subprocess
    import sys
    code = f"""
import threading
from orthrus_gguf import Orthrus, OrthrusError
m = Orthrus({str(path)!r}, n_ctx=256, n_threads=1)
m.close()
for call in (lambda: m.generate("hi", max_tokens=4), lambda: m.apply_chat_template([{{"role": "user", "content": "x"}}])):
    try:
        call()
    except OrthrusError:
        pass
m = Orthrus({str(path)!r}, n_ctx=256, n_threads=1)
def work():
    for _ in range(20):
        try:
            m.generate("def f(x):", max_tokens=16)
        except OrthrusError:
            pass
ts = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
print("survived")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "survived", r.stderr[-2000:]


def test_an_empty_stop_string_stops_nothing(path):
    """stop="" would match at offset 0 and cut the answer to nothing: it is ignored."""
    with Orthrus(path, n_ctx=256, n_threads=1, exact="all") as m:  # a cached call = a fresh one
        full = m.generate("def f(x):", max_tokens=12)
        for stop in ("", [""], ["", "\u2603never"]):
            r = m.generate("def f(x):", max_tokens=12, stop=stop)
            assert r.text == full.text and r.finish_reason == full.finish_reason


def test_cli_text_outputs_and_counts_are_checked_before_the_work(tmp_path, tiny_gguf):
    """What the CLI used to answer with a traceback: a prompt, grammar or prompts file that is
    not UTF-8, a command line that is not (a lone surrogate), a plot suffix matplotlib cannot
    write and a report in a folder that does not exist (found after the whole run), -n 1 (a
    division by zero), a full stdout; and bench-server runs a baseline before refusing -n 0,
    a bad --draft-max or a GGUF without the diffusion view. Each is exit 2 (1 for the full
    stdout) with a one-line message, before any model work."""
    import os
    import subprocess
    import sys
    from test_native import plain_qwen3_copy
    gguf = tiny_gguf("f32", tied=False)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x80abc")

    def cli(*args, stdout=subprocess.PIPE):
        r = subprocess.run([sys.executable.encode(), b"-m", b"orthrus_gguf.cli",
                            *(a if isinstance(a, bytes) else str(a).encode() for a in args)],
                           stdout=stdout, stderr=subprocess.PIPE, timeout=300)
        err = r.stderr.decode(errors="replace")
        assert "Traceback" not in err, err[-3000:]
        return r.returncode, err
    cases = [
        (("generate", "-m", gguf, "-f", binary), 2, f"the prompt file {binary} is not UTF-8 text: byte 0xff at offset 0"),
        (("generate", "-m", gguf, "-p", "x", "--grammar-file", binary), 2, "the grammar file"),
        (("generate", "-m", gguf, "-p", b"a\xffb"), 2, "is not valid Unicode"),
        (("bench", "-m", gguf, "--prompts", binary), 2, "is not UTF-8 text"),
        (("bench", "-m", gguf, "-n", 1), 2, "1 is not in the range x>=2"),
        (("bench", "-m", gguf, "--plot", tmp_path / "x.txt"), 2, "a plot needs an image suffix"),
        (("bench", "-m", gguf, "--json", tmp_path), 2, "is a directory: name a file to write"),
        (("demo", "--json", tmp_path / "no" / "d.json"), 2, "cannot write there"),
        (("demo", "-n", 1), 2, "1 is not in the range x>=2"),
        (("bench-server", "-m", gguf, "-n", 0), 2, "max_tokens (-n) must be an integer >= 1"),
        (("bench-server", "-m", gguf, "--temp", "nan"), 2, "temperature (--temp) must be a finite number >= 0"),
        (("bench-server", "-m", gguf, "--draft-max", 99), 2, "--draft-max must be in [1, "),
        (("bench-server", "-m", plain_qwen3_copy(gguf, tmp_path / "plain.gguf")), 2, "is not an orthrus-qwen3 GGUF"),
    ]
    for args, rc, msg in cases:
        got_rc, err = cli(*args)
        assert (got_rc, msg in err) == (rc, True), (args, got_rc, err[-1500:])
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "no").exists()
    if os.path.exists("/dev/full"):
        with open("/dev/full", "wb") as full:
            got_rc, err = cli("generate", "-m", gguf, "-p", "def f", "-n", 8, "--mode", "ar", stdout=full)
        assert got_rc == 1 and "cannot write the output: No space left on device" in err, err
