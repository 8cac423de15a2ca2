"""`make gpu-check` as the device machine runs it, on this CPU: a copy of the tree (what the
device tool sends: tracked and untracked-not-ignored files), no editable install, a python3
that has only what the device's has (our dependencies less the carried ones), and .carry
made by `--make-carry`. What this cannot check is the GPU itself."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from orthrus_gguf import build
from orthrus_gguf.errors import OrthrusError
from orthrus_gguf.gpu_check import CARRIED_BUILDS, CARRIED_INFO, CARRY_PACKAGES, CARRY_SOURCE

ROOT = Path(__file__).resolve().parent.parent


def _tree_copy(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    return dest


def _device_python(dest: Path) -> Path:
    """A venv whose only packages are this one's less orthrus_gguf and the carried ones."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", dest], check=True)
    site = Path(sysconfig.get_paths()["purelib"])
    have = dest / "have"
    have.mkdir()
    carried = tuple(CARRY_PACKAGES) + ("orthrus_gguf", "__editable__", "_orthrus")
    for entry in site.iterdir():
        base = entry.name.split("-")[0].lower()
        if entry.suffix == ".pth" or base.startswith(carried) or base in ("llama_cpp_python", "orthrus_gguf"):
            continue
        (have / entry.name).symlink_to(entry)
    vsite = next((dest / "lib").glob("python3*/site-packages"))
    (vsite / "device.pth").write_text(f"{have}\n")
    return dest / "bin"


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    if not (ROOT / ".git").exists():
        pytest.fail("the device rehearsal needs a git checkout (it copies what `git ls-files` lists)")
    base = tmp_path_factory.mktemp("device")
    tree = _tree_copy(base / "tree")
    bindir = _device_python(base / "py")
    # with this machine's CPU build, as a CUDA build made here would travel (--prebuilt)
    r = subprocess.run([sys.executable, "-m", "orthrus_gguf.gpu_check", "--make-carry", tree / ".carry",
                        "--prebuilt", "cpu"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return tree, bindir


def _make(tree: Path, bindir: Path, out: Path, flags: str, **extra_env):
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", OUT=str(out), **extra_env)
    for k in ("PYTHONPATH", "VIRTUAL_ENV", "ORTHRUS_GGUF_LIB_DIR"):
        env.pop(k, None)
    return subprocess.run(["make", "--no-print-directory", "-C", tree, "gpu-check", f"GPU_CHECK_FLAGS={flags}"],
                          env=env, capture_output=True, text=True, timeout=900)


def test_without_the_carry_it_names_what_is_missing(device, tmp_path):
    """Before building anything: exit 2, and each missing package with where it comes from."""
    tree, bindir = device
    env = dict(os.environ, PYTHONPATH=str(tree))
    r = subprocess.run([bindir / "python3", "-m", "orthrus_gguf.gpu_check", "--backend", "cpu", "--out", tmp_path],
                       cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    for name in CARRY_PACKAGES:
        assert f"{name} (carried: make gpu-carry" in rep["error"]
    assert "numpy" not in rep["error"] and "error: missing Python packages" in r.stdout


def test_cpu_path_as_on_the_device(device, tmp_path):
    """The CPU path, from the copy, with the carry: JSON, plot, log, and the convert link."""
    tree, bindir = device
    assert (tree / ".carry" / CARRY_SOURCE).stat().st_size > 1 << 20
    assert not (tree / ".carry" / "site" / "llama_cpp" / "lib").exists()  # a link would not travel
    out = tmp_path / "out"
    r = _make(tree, bindir, out, "--quick --skip-tests --backend cpu")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    assert rep["backend"] == "cpu" and rep["skipped"] == [] and "error" not in rep
    costs = rep["costs"]["orthrus-tiny f16"]
    assert [row["width"] for row in costs["kept_graphs"]["rows"]] == [1, 2, 4, 8]
    assert all(row["reused"] == 1.0 for row in costs["kept_graphs"]["rows"])
    assert set(rep["demo"]["f16"]["groups"]) == {"code", "math"}
    pf = rep["prefill_cpu_layers"]
    assert pf["tokens"] == 500 and pf["exact_over_fast"] > 0 and pf["reference_kernels_tokens_per_second"] > 0
    assert "tiny_auto_speedup_min" in rep["met"]
    assert (out / "gpu_check.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in (out / "gpu_check.log").read_text()
    assert (tree / "orthrus_gguf" / "convert").resolve() == (tree / "convert").resolve()


def test_spent_budget_skips_the_rest_and_says_so(device, tmp_path):
    tree, bindir = device
    r = _make(tree, bindir, tmp_path, "--quick --backend cpu --budget 0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["skipped"] == ["tests", "costs orthrus-tiny f16", "prefill with CPU layers", "demo"]
    assert "skipped demo: the budget of 0 s is spent" in r.stdout
    assert "demo" not in rep and not rep["costs"]


def test_backend_is_found_off_path_and_a_gpu_without_nvcc_is_an_error(tmp_path, monkeypatch):
    """An NVIDIA machine whose nvcc is not on PATH must not quietly measure its CPU."""
    from orthrus_gguf.gpu_check import detect_backend
    bin_, cuda = tmp_path / "bin", tmp_path / "cuda"
    for d, tool in ((bin_, "nvidia-smi"), (cuda / "bin", "nvcc")):
        d.mkdir(parents=True)
        (d / tool).write_text("#!/bin/sh\n")
        (d / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert detect_backend() == "cpu"  # no nvidia-smi anywhere
    monkeypatch.setenv("PATH", str(bin_))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "none"))
    with pytest.raises(SystemExit, match="NVIDIA GPU is here .* but no nvcc: set CUDA_HOME"):
        detect_backend()
    monkeypatch.setenv("CUDA_HOME", str(cuda))
    assert detect_backend() == "cuda"
    assert os.environ["PATH"].split(os.pathsep)[0] == str(cuda / "bin")  # CMake finds it too


def test_make_carry_never_replaces_another_folder(tmp_path):
    """--make-carry replaces only a carry: pointed at a folder with other files it refuses
    (exit 1, the files untouched) and leaves no half-made carry beside it."""
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    r = subprocess.run([sys.executable, "-m", "orthrus_gguf.gpu_check", "--make-carry", other],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "exists and is not a carry" in r.stderr
    assert (other / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_costs_with_backend_sampling_add_the_host_argmax_table(tiny_gguf, tmp_path):
    """Where greedy picks run in the graph (forced here on the CPU), the cost step also times
    the same forwards with their logits sent to the host, and the plot draws both in one unit."""
    from orthrus_gguf.gpu_check import HOST_ARGMAX_WIDTHS, Log, cost_step, plot
    path = tiny_gguf("f32", tied=False)
    costs = cost_step("tiny", path, 0, (1, 2, 3, 4), rounds=1, log=Log(tmp_path / "log"), backend_sampling=True)
    assert costs["kept_graphs"]["backend_sampling"] and costs["single_graph"]["backend_sampling"]
    host = costs["host_argmax"]
    assert host["backend_sampling"] is False
    assert [r["width"] for r in host["rows"]] == [w for w in (1, 2, 3, 4) if w in HOST_ARGMAX_WIDTHS]
    assert "argmax on the device (backend sampling)" in (tmp_path / "log").read_text()
    plot({"backend": "cpu", "costs": {"tiny": costs}}, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    # as the device check runs a CPU: no backend sampling, so no third table
    assert "host_argmax" not in cost_step("tiny", path, 0, (1, 2), rounds=1, log=Log(tmp_path / "log2"))


def _log(lines):
    return lambda msg: lines.append(msg)


def test_a_carried_build_is_used_and_nothing_is_compiled(device, tmp_path):
    """On a machine with an empty cache, the check takes the carried build of its inputs: the
    same files as the build here, compiled nowhere (no work tree), and it loads."""
    tree, bindir = device
    cache = tmp_path / "cache"
    r = _make(tree, bindir, tmp_path / "out", "--quick --backend cpu --budget 0", ORTHRUS_GGUF_CACHE=str(cache))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    here = build.library_dir("cpu")
    key = here.name
    assert f"unpacked the carried build {key}.tar.xz" in r.stdout
    assert "the carried build works here" in r.stdout
    assert sorted(os.listdir(cache / "llama.cpp")) == [key]  # no work-cpu: nothing built
    got = cache / "llama.cpp" / key
    for f in here.iterdir():
        if f.is_file() and not f.is_symlink():
            assert (got / f.name).read_bytes() == f.read_bytes(), f.name
        elif f.is_symlink():
            assert os.readlink(got / f.name) == os.readlink(f)
    info = json.loads((got / CARRIED_INFO).read_text())
    assert info["key"] == key
    assert "libggml.so.0" in info["needs"][next(f.name for f in here.glob("libllama.so.*.*"))]


def test_a_carried_build_of_other_inputs_or_broken_is_not_used(tmp_path, monkeypatch):
    """A carried build keyed otherwise is ignored, and said so; one that cannot be unpacked
    is an error naming it that leaves nothing in the cache."""
    from orthrus_gguf.gpu_check import unpack_carried
    monkeypatch.setenv("ORTHRUS_GGUF_CACHE", str(tmp_path / "cache"))
    carry = tmp_path / "carry"
    (carry / CARRIED_BUILDS).mkdir(parents=True)
    (carry / CARRIED_BUILDS / "cpu-0123456789abcdef.tar.xz").write_bytes(b"")
    lines = []
    assert unpack_carried(carry, "cpu", _log(lines)) is None
    key = build.build_key("cpu")
    assert lines == [f"carried build cpu-0123456789abcdef.tar.xz: not of these inputs ({key}), so not used"]
    (carry / CARRIED_BUILDS / f"{key}.tar.xz").write_bytes(b"not xz")
    with pytest.raises(OrthrusError, match=f"cannot unpack .*{key}.tar.xz"):
        unpack_carried(carry, "cpu", _log(lines))
    assert not (tmp_path / "cache" / "llama.cpp").exists() or not any((tmp_path / "cache" / "llama.cpp").iterdir())


def test_a_carried_build_that_does_not_work_here_is_replaced_by_a_build(tmp_path, monkeypatch):
    """The probe loads the carried build in a child; where it fails (here a libllama
    that is no library) the carried build is removed and the check builds from source."""
    from orthrus_gguf import gpu_check
    from orthrus_gguf.gpu_check import Log, build_step, pack_build
    here = build.library_dir("cpu")
    broken = tmp_path / "broken" / here.name
    shutil.copytree(here, broken, symlinks=True)
    lib = next(broken.glob("libllama.so.*.*"))
    lib.write_bytes(b"not a library")
    root = tmp_path / "root"
    pack_build(broken, root / ".carry" / CARRIED_BUILDS, preset=0)
    monkeypatch.setattr(gpu_check, "ROOT", root)
    monkeypatch.setenv("ORTHRUS_GGUF_CACHE", str(tmp_path / "cache"))
    # build_step sets it: set first, so that monkeypatch takes it away again afterwards
    monkeypatch.setenv("ORTHRUS_GGUF_LIB_DIR", "")
    monkeypatch.delenv("ORTHRUS_GGUF_LIB_DIR")
    real, calls = build.build, []

    def fake_build(backend, **kw):
        calls.append(backend)
        d = build.build_dir(backend)
        return real(backend, **kw) if (d / build.MARKER).is_file() else here  # "built"
    monkeypatch.setattr(build, "build", fake_build)
    assert build_step("cpu", Log(tmp_path / "log")) == here
    log = (tmp_path / "log").read_text()
    assert "the carried build does not work here (does not load (exit 1)" in log and ": building here" in log
    assert calls == ["cpu", "cpu"] and not build.build_dir("cpu").exists()


def test_the_libraries_a_carried_build_needs_are_found_beside_this_python(tmp_path, monkeypatch):
    """What the loader cannot find (cuBLAS in torch's nvidia wheels) is found there, loaded,
    and put on LD_LIBRARY_PATH for the children; what is nowhere is named."""
    from orthrus_gguf.gpu_check import runtime_libraries
    wheel = tmp_path / "site" / "nvidia" / "cu13" / "lib"
    wheel.mkdir(parents=True)
    (tmp_path / "x.c").write_text("int orthrus_fake(void) { return 7; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libfake-orthrus.so.1", "-o",
                    wheel / "libfake-orthrus.so.1", tmp_path / "x.c"], check=True)
    lib_dir = tmp_path / "build"
    lib_dir.mkdir()
    (lib_dir / "libggml-cuda.so.0").write_bytes(b"")
    needs = {"libggml-cuda.so.0": ["libfake-orthrus.so.1", "libc.so.6"], "libllama.so.0": ["libggml-cuda.so.0"]}
    (lib_dir / CARRIED_INFO).write_text(json.dumps({"key": "x", "needs": needs}))
    monkeypatch.setattr(build, "_search_dirs", lambda: [tmp_path / "site"])
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-toolkit"))
    monkeypatch.setenv("LD_LIBRARY_PATH", "/before")
    assert runtime_libraries(lib_dir) == [wheel / "libfake-orthrus.so.1"]
    assert os.environ["LD_LIBRARY_PATH"] == f"{wheel}{os.pathsep}/before"
    needs["libllama.so.0"].append("libcublas-nowhere.so.13")
    (lib_dir / CARRIED_INFO).write_text(json.dumps({"key": "x", "needs": needs}))
    with pytest.raises(OrthrusError, match="libcublas-nowhere.so.13 found neither by the loader nor in"):
        runtime_libraries(lib_dir)


def test_prebuilt_names_what_it_takes(tmp_path):
    for args, rc, msg in ((["--prebuilt", "cpu"], 2, "--prebuilt goes with --make-carry DIR"),
                          (["--make-carry", tmp_path / "c", "--prebuilt", "cuda:sm90"], 1,
                           "give cuda:ARCH (ARCH the GPU's compute capability")):
        r = subprocess.run([sys.executable, "-m", "orthrus_gguf.gpu_check", *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == rc and msg in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.part").exists()


def _children():
    r = subprocess.run(["pgrep", "-f", "orthrus_gguf.gpu_check --child"], capture_output=True, text=True)
    return r.stdout.split()


def test_a_step_that_fails_costs_only_that_step(tmp_path):
    """Each measuring step runs in a child: one that dies (here a GGUF that is not there; on
    a GPU a CUDA error aborts) comes back as an error with its last words, in the log too."""
    from orthrus_gguf.gpu_check import Log, in_child
    log = Log(tmp_path / "log")
    r = in_child("table", dict(path=str(tmp_path / "none.gguf"), ngl=0, slots=16, backend_sampling=None,
                               widths=[1, 2], rounds=1), log, timeout_s=120)
    assert r["error"] == "table exited 1" and "none.gguf" in " ".join(r["tail"])
    assert "table failed: exited 1" in (tmp_path / "log").read_text()


def test_a_step_past_the_budget_is_stopped_with_its_children(tmp_path):
    """The demo (a minute here) given 3 s: stopped, said so, no child process left."""
    from orthrus_gguf.gpu_check import Log, in_child
    before = _children()
    t0 = time.monotonic()
    r = in_child("demo", dict(outtypes=["f16", "q4_k_m"], max_tokens=96, ngl=0, max_prompts=None),
                 Log(tmp_path / "log"), timeout_s=3)
    assert r["error"] == "demo stopped after 3 s (the check's budget)"
    assert time.monotonic() - t0 < 30 and _children() == before
