"""orthrus_gguf.build: cache keys, patch failures, the no-op second build, lazy loading."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orthrus_gguf import build
from orthrus_gguf.errors import OrthrusError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_copy(tmp_path):
    """A copy of patches/ and native/ whose bytes a test may change."""
    for d in ("patches", "native"):
        shutil.copytree(REPO / d, tmp_path / d)
    return tmp_path


def test_patch_series_is_numbered_and_nonempty():
    patches = build.patch_files()
    assert patches, "no patches"
    for i, p in enumerate(patches, 1):
        assert p.name.startswith(f"{i:04d}-"), p.name
        text = p.read_text()
        assert text.startswith("From ") and "Subject: [PATCH" in text, f"{p.name} is not git format-patch output"
    assert any(rel == "src/llama-orthrus.cpp" for _, rel in build.native_files())


def test_key_depends_on_every_input(data_copy):
    base = build.build_key("cpu", data_copy)
    assert base == build.build_key("cpu", data_copy)
    assert build.build_key("cuda", data_copy) != base

    native = data_copy / "native" / "src" / "llama-orthrus.cpp"
    native.write_bytes(native.read_bytes() + b"\n")
    changed_native = build.build_key("cpu", data_copy)
    assert changed_native != base

    patch = sorted((data_copy / "patches").glob("*.patch"))[-1]
    patch.write_bytes(patch.read_bytes() + b"\n")
    assert build.build_key("cpu", data_copy) not in (base, changed_native)

    # the README does not change the build
    readme = data_copy / "native" / "README.md"
    before = build.build_key("cpu", data_copy)
    readme.write_text(readme.read_text() + "\nmore words\n")
    assert build.build_key("cpu", data_copy) == before


def test_cache_location_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("ORTHRUS_GGUF_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_root() == tmp_path / "xdg" / "orthrus-gguf"
    monkeypatch.setenv("ORTHRUS_GGUF_CACHE", str(tmp_path / "mine"))
    assert build.cache_root() == tmp_path / "mine"
    assert build.library_dir("cpu") is None  # nothing built there
    monkeypatch.setenv("ORTHRUS_GGUF_LIB_DIR", str(tmp_path / "lib"))
    assert build.library_dir() == tmp_path / "lib"


def test_unknown_backend():
    with pytest.raises(OrthrusError, match="unknown backend"):
        build.build_key("rocm")


def test_failing_patch_names_the_patch(data_copy, tmp_path):
    tree = tmp_path / "tree"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "llama-arch.h").write_text("not the upstream file\n")
    first = sorted((data_copy / "patches").glob("*.patch"))[0]
    with pytest.raises(OrthrusError) as e:
        build.apply_patches(tree, data_copy, progress=False)
    assert first.name in str(e.value) and "to recover" in str(e.value)


def test_missing_data_is_a_clear_error(monkeypatch, tmp_path):
    fake = tmp_path / "pkg" / "orthrus_gguf" / "build.py"
    fake.parent.mkdir(parents=True)
    monkeypatch.setattr(build, "__file__", str(fake))
    with pytest.raises(OrthrusError, match="patches/ and native/ not found"):
        build.data_root()


def test_second_build_is_a_cache_hit(monkeypatch):
    """After `orthrus-gguf build` (CI does it first) nothing is rebuilt: no subprocess, the
    marker untouched, well under a second."""
    lib = build.library_dir("cpu")
    if lib is None:
        pytest.fail("no finished cpu build for the current sources: run `orthrus-gguf build`")
    marker = lib / build.MARKER
    mtime = marker.stat().st_mtime_ns

    def no_subprocess(*a, **k):
        raise AssertionError(f"build() ran a command on a cache hit: {a[0] if a else k}")
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    t0 = time.monotonic()
    assert build.build("cpu", progress=False) == lib
    assert time.monotonic() - t0 < 1.0
    assert marker.stat().st_mtime_ns == mtime
    for name in ("libllama.so", "llama-quantize", "llama-server", "build-info.json"):
        assert (lib / name).exists(), name


def test_import_is_lazy_and_missing_build_is_explained(tmp_path):
    code = (
        "import sys, orthrus_gguf, orthrus_gguf.native as n\n"
        "assert 'llama_cpp' not in sys.modules\n"
        "try:\n"
        "    n.load()\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORTHRUS_GGUF_", "LLAMA_CPP_LIB"))}
    env["ORTHRUS_GGUF_CACHE"] = str(tmp_path / "empty-cache")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "OrthrusError" in r.stdout and "orthrus-gguf build" in r.stdout, r.stdout


def test_an_interrupted_step_takes_its_whole_process_group(tmp_path):
    """_run_logged runs cmake/ninja in their own session and, interrupted, kills the group:
    no compiler (here a sleeping grandchild) outlives the build."""
    import os
    import signal
    import time

    from orthrus_gguf.build import _run_logged
    pidfile = tmp_path / "pid"

    def ring(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            _run_logged(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], tmp_path / "log", dict(os.environ),
                        progress=False)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    pid = int(pidfile.read_text())
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the grandchild {pid} survived")


def test_a_backend_that_cannot_configure_leaves_its_log_not_its_tree(tmp_path, monkeypatch):
    import orthrus_gguf.build as b
    monkeypatch.setenv("ORTHRUS_GGUF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(b, "fetch_sdist", lambda progress: None)
    monkeypatch.setattr(b, "extract_tree", lambda src, tree, **kw: tree.mkdir(parents=True))
    monkeypatch.setattr(b, "copy_native", lambda tree, root: None)
    monkeypatch.setattr(b, "apply_patches", lambda tree, root, progress: None)

    def failing_configure(tree, bdir, backend, progress):
        (tree.parent / "configure.log").write_text("Could not find Vulkan\n")
        raise OrthrusError(f"cmake -S … failed (exit 1); full log: {tree.parent / 'configure.log'}\nCould not find Vulkan")
    monkeypatch.setattr(b, "_configure", failing_configure)
    with pytest.raises(OrthrusError, match="configure-vulkan-failed.log") as e:
        b.build("vulkan", progress=False)
    root = tmp_path / "cache" / "llama.cpp"
    assert not (root / "work-vulkan").exists()
    assert (root / "configure-vulkan-failed.log").read_text() == "Could not find Vulkan\n"
    assert "Could not find Vulkan" in str(e.value)


# A CUDA toolkit assembled from NVIDIA's pip wheels has no cuBLAS and no libcuda stub; the
# first configure's cache then says so (these lines are as CMake 3.25 writes them).
_CUDA_CACHE = """\
CUDAToolkit_BIN_DIR:PATH=/usr/local/cuda-13.0/bin
CUDA_cublasLt_LIBRARY:FILEPATH=CUDA_cublasLt_LIBRARY-NOTFOUND
CUDA_cublas_LIBRARY:FILEPATH=CUDA_cublas_LIBRARY-NOTFOUND
CUDA_cuda_driver_LIBRARY:FILEPATH=CUDA_cuda_driver_LIBRARY-NOTFOUND
CUDA_cudart_LIBRARY:FILEPATH=/usr/local/cuda-13.0/lib/libcudart.so
//ADVANCED property for variable: CUDA_cublas_LIBRARY
CUDA_cublas_LIBRARY-ADVANCED:INTERNAL=1
"""


def _cuda_build_dir(path: Path, cache: str = _CUDA_CACHE, version: str = "13.0.88") -> Path:
    (path / "CMakeFiles" / "3.25.1").mkdir(parents=True, exist_ok=True)
    (path / "CMakeCache.txt").write_text(cache)
    (path / "CMakeFiles" / "3.25.1" / "CMakeCUDACompiler.cmake").write_text(
        f'set(CMAKE_CUDA_COMPILER "/usr/local/bin/nvcc")\nset(CMAKE_CUDA_COMPILER_VERSION "{version}")\n')
    return path


def _wheel(site: Path, sub: str, major: str) -> Path:
    """The layout of an nvidia-cublas wheel (with a runtime header beside, as nvidia/cu13 has)."""
    root = site / "nvidia" / sub
    (root / "lib").mkdir(parents=True)
    (root / "include").mkdir()
    for name in (f"libcublas.so.{major}", f"libcublasLt.so.{major}"):
        (root / "lib" / name).write_bytes(b"\x7fELF")
    for name in ("cublas_v2.h", "cublas_api.h", "cublasLt.h", "cuda_runtime.h"):
        (root / "include" / name).write_text("/* header */\n")
    return root


def test_cmake_cache_is_read_with_the_compiler_version(tmp_path):
    c = build._cmake_cache(_cuda_build_dir(tmp_path / "b"))
    assert c["CUDA_cublas_LIBRARY"] == "CUDA_cublas_LIBRARY-NOTFOUND"
    assert c["CUDA_cudart_LIBRARY"] == "/usr/local/cuda-13.0/lib/libcudart.so"
    assert c["CMAKE_CUDA_COMPILER_VERSION"] == "13.0.88"
    assert build._cmake_cache(tmp_path / "nothing") == {}


def test_a_toolkit_without_cublas_or_libcuda_is_completed_from_the_wheels(tmp_path):
    cache = build._cmake_cache(_cuda_build_dir(tmp_path / "b"))
    site = tmp_path / "site"
    _wheel(site, "cu12", "12")  # another major version: never taken for a 13.x toolkit
    w = _wheel(site, "cu13", "13")
    driver = tmp_path / "driver" / "libcuda.so.1"
    flags, missing = build.cuda_completion(cache, [tmp_path / "empty", site], driver, tmp_path / "overlay")
    assert missing == []
    inc = tmp_path / "overlay" / "include"
    assert flags == [f"-DCUDA_cublas_LIBRARY={w / 'lib' / 'libcublas.so.13'}",
                     f"-DCUDA_cublasLt_LIBRARY={w / 'lib' / 'libcublasLt.so.13'}",
                     f"-DCMAKE_CUDA_STANDARD_INCLUDE_DIRECTORIES={inc}",
                     f"-DCUDA_cuda_driver_LIBRARY={driver}"]
    # only cuBLAS's headers: the toolkit's own runtime headers stay the ones nvcc uses
    assert sorted(p.name for p in inc.iterdir()) == ["cublasLt.h", "cublas_api.h", "cublas_v2.h"]
    assert (inc / "cublas_v2.h").resolve() == (w / "include" / "cublas_v2.h").resolve()


def test_a_complete_toolkit_needs_nothing_and_a_hopeless_one_says_what_to_do(tmp_path):
    complete = _CUDA_CACHE.replace("CUDA_cublas_LIBRARY-NOTFOUND", "/cuda/lib64/libcublas.so").replace(
        "CUDA_cuda_driver_LIBRARY-NOTFOUND", "/cuda/lib64/stubs/libcuda.so")
    cache = build._cmake_cache(_cuda_build_dir(tmp_path / "ok", complete))
    assert build.cuda_completion(cache, [], None, tmp_path / "o1") == ([], [])
    # a cuBLAS 12 wheel beside a CUDA 13 toolkit, and no driver on the machine
    site = tmp_path / "site"
    _wheel(site, "cublas", "12")
    cache = build._cmake_cache(_cuda_build_dir(tmp_path / "bad"))
    flags, missing = build.cuda_completion(cache, [site], None, tmp_path / "o2")
    assert flags == [] and len(missing) == 2
    assert missing[0].startswith("cuBLAS") and "pip install nvidia-cublas" in missing[0]
    assert missing[1].startswith("libcuda") and "-DGGML_CUDA_NO_VMM=ON" in missing[1]
    # without VMM ggml-cuda does not link libcuda
    cache["GGML_CUDA_NO_VMM"] = "ON"
    assert [m[:6] for m in build.cuda_completion(cache, [site], None, tmp_path / "o3")[1]] == ["cuBLAS"]


def test_cuda_configure_runs_again_with_the_completion_or_names_what_is_missing(tmp_path, monkeypatch):
    bdir = tmp_path / "work" / "llama.cpp" / "build"
    calls = []

    def run_logged(cmd, log, env, progress):
        calls.append(cmd)
        if len(calls) == 1:
            _cuda_build_dir(bdir)
            raise OrthrusError("cmake -S … failed (exit 1)")
    monkeypatch.setattr(build, "_run_logged", run_logged)
    site = tmp_path / "site"
    w = _wheel(site, "cu13", "13")
    monkeypatch.setattr(build, "_search_dirs", lambda: [site])
    monkeypatch.setattr(build, "_driver_library", lambda: tmp_path / "libcuda.so.1")
    build._configure(tmp_path / "work" / "llama.cpp", bdir, "cuda", progress=False)
    assert len(calls) == 2 and calls[1][: len(calls[0])] == calls[0]
    assert f"-DCUDA_cublas_LIBRARY={w / 'lib' / 'libcublas.so.13'}" in calls[1]
    # no wheel and no driver: one clear error, no second configure
    shutil.rmtree(bdir)
    calls.clear()
    monkeypatch.setattr(build, "_search_dirs", lambda: [])
    monkeypatch.setattr(build, "_driver_library", lambda: None)
    with pytest.raises(OrthrusError, match="cannot configure the CUDA backend: missing cuBLAS .*; libcuda "):
        build._configure(tmp_path / "work" / "llama.cpp", bdir, "cuda", progress=False)
    assert len(calls) == 1
    # another backend's failure is never retried
    calls.clear()
    with pytest.raises(OrthrusError, match="failed"):
        build._configure(tmp_path / "work" / "llama.cpp", bdir, "vulkan", progress=False)
    assert len(calls) == 1


def test_the_carried_source_keeps_long_paths_in_place(tmp_path, monkeypatch):
    """Names over 100 bytes travel in PAX records; renaming a member must rename those too,
    or the CUDA template instances land under the sdist's prefix and CMake cannot find them."""
    import io
    import tarfile
    short, long = "ggml/CMakeLists.txt", "ggml/src/ggml-cuda/template-instances/" + "x" * 80 + ".cu"
    sdist = tmp_path / "sdist.tar.gz"
    with tarfile.open(sdist, "w:gz", format=tarfile.PAX_FORMAT) as t:
        for name in (short, long, "media/skipped.png"):
            data = name.encode()
            info = tarfile.TarInfo(build.SDIST_TREE + name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(build, "fetch_sdist", lambda progress: sdist)
    carried = build.write_source_tarball(tmp_path / "src.tar.gz")
    with tarfile.open(carried) as t:
        assert sorted(t.getnames()) == sorted([short, long])
    build.extract_tree(carried, tmp_path / "tree", prefix="")
    assert (tmp_path / "tree" / long).read_text() == long
    assert (tmp_path / "tree" / short).read_text() == short


def test_the_carried_source_of_the_pinned_sdist_is_its_tree(tmp_path):
    """The real sdist (fetched by the build): every file of vendor/llama.cpp outside the
    skipped folders, at its own path, the CUDA template instances included."""
    import tarfile
    carried = build.write_source_tarball(tmp_path / "src.tar.gz")
    with tarfile.open(build.fetch_sdist(progress=False)) as t:
        want = {n[len(build.SDIST_TREE):] for n in t.getnames() if n.startswith(build.SDIST_TREE)}
    want = {n for n in want if n and not n.startswith(build._SOURCE_SKIP) and n != ".git"}
    with tarfile.open(carried) as t:
        got = set(t.getnames())
    assert got == want
    assert "ggml/src/ggml-cuda/template-instances/fattn-vec-instance-f16-f16.cu" in got


def test_the_driver_stub_has_every_driver_call_of_the_pinned_ggml_cuda():
    """CUDA_DRIVER_CALLS is what the pinned tree's ggml-cuda calls of the driver API (cu*
    functions; cuda* is the runtime): a stub missing one would not link the device's tools."""
    import re
    import tarfile
    calls = set()
    prefix = build.SDIST_TREE + "ggml/src/ggml-cuda/"
    with tarfile.open(build.fetch_sdist(progress=False)) as t:
        for m in t.getmembers():
            if m.isfile() and m.name.startswith(prefix) and m.name.endswith((".cu", ".cuh")):
                text = t.extractfile(m).read().decode(errors="replace")
                calls |= set(re.findall(r"\b(cu[A-Z][a-z]+\w*)\s*\(", text))
    assert calls == set(build.CUDA_DRIVER_CALLS)


def test_the_driver_stub_links_by_the_driver_s_name_and_fails_every_call(tmp_path):
    """libcuda.so.1 of write_driver_stub: that soname, and each call returns
    CUDA_ERROR_STUB_LIBRARY (in a child: the stub must not stand in for a real driver here)."""
    stub = build.write_driver_stub(tmp_path)
    assert stub.name == "libcuda.so.1"
    r = subprocess.run(["readelf", "-d", stub], capture_output=True, text=True, check=True)
    assert "Library soname: [libcuda.so.1]" in r.stdout
    code = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); "
            "print(sorted({getattr(lib, n)() for n in sys.argv[2:]}))")
    r = subprocess.run([sys.executable, "-c", code, stub, *build.CUDA_DRIVER_CALLS],
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == f"[{build.CUDA_ERROR_STUB_LIBRARY}]" == "[34]"


def test_a_named_driver_library_comes_first(monkeypatch, tmp_path):
    monkeypatch.setenv("ORTHRUS_GGUF_CUDA_DRIVER", str(tmp_path / "libcuda.so.1"))
    assert build._driver_library() == tmp_path / "libcuda.so.1"
