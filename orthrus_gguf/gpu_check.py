"""`make gpu-check`: everything a lent GPU machine should measure, in one call.

    python -m orthrus_gguf.gpu_check --out DIR [--quick] [--skip-tests]

1. builds the patched llama.cpp (CUDA for the local architecture when nvcc is there, else
   the CPU; only libllama and llama-quantize), or takes the build of the same inputs that
   `--make-carry DIR --prebuilt cuda:90` made elsewhere and carried, once it loads here and
   sees the GPU;
2. runs the tests that mean something on the GPU (both views against the reference, the
   kept graphs, batched drafts) with every layer offloaded (ORTHRUS_TEST_GPU_LAYERS=-1);
3. measures the cost table (draft(w), verify(w), alternating pair vs back to back, w in 1..32,
   one one-token forward as the unit) with kept graphs and without (upstream's single graph),
   on orthrus-tiny f16 and on random Qwen3-1.7B- and 8B-shaped q4_k_m GGUFs;
4. times a 500-token prompt of orthrus-tiny f16 with every layer on the CPU
   (n_gpu_layers=0) in each exact mode: exact verifies run without llama.cpp's op offload,
   prompts keep it, so "verify" must prefill as fast as "off" (the GPU computes the prompt's
   products in both) and "all" shows what the CPU's batch-invariant kernels would cost;
5. runs the demo (AR against Orthrus B=32 and auto on held-out code and math prompts);
6. writes DIR/gpu_check.json (every figure, the targets and whether each was met; rewritten
   after every step, so a run cut short still leaves what it measured), DIR/gpu_check.png and
   DIR/gpu_check.log.

The device machine has its own python3 with numpy, torch, safetensors, tokenizers, click,
jinja2, pytest and matplotlib, and no package registry. `--make-carry DIR` (here, `make
gpu-carry`) writes the rest into DIR: the packages below on PYTHONPATH, and the llama.cpp
source. A check that would run past --budget seconds skips its remaining steps (and says so)
rather than be killed.

The same script runs on a CPU (no nvcc): then it is the CPU path, tested in CI with --quick,
also as the device runs it (tests/test_gpu_check.py: a copy of the tree, no editable install,
only the packages the device has plus the carried ones).
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import importlib.util
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from .errors import OrthrusError, Signalled, raise_signal

ROOT = Path(__file__).resolve().parent.parent
# the targets (GPU only): what a step must cost for Orthrus to pay
TARGETS = {"tiny_auto_speedup_min": 1.3, "1.7b_pair16_max": 2.5, "8b_pair16_max": 2.3}
# what the check imports that the device's python3 has (its image lists them all: tqdm is
# the bench's progress), and what must be carried to it
DEVICE_HAS = ("numpy", "torch", "safetensors", "tokenizers", "click", "jinja2", "pytest", "matplotlib", "tqdm")
CARRY_PACKAGES = ("gguf", "llama_cpp", "diskcache")
CARRY_SOURCE = "llama.cpp-src.tar.gz"
# finished builds made here for the device (--prebuilt), <build key>.tar.xz, so that the
# device compiles nothing (the CUDA backend is ~2,800 CPU-seconds); each holds CARRIED_INFO:
# the shared libraries its files need by name, found again on the machine it lands on
CARRIED_BUILDS = "builds"
CARRIED_INFO = "carried.json"
# the tests that mean something offloaded (ORTHRUS_TEST_GPU_LAYERS): both views against the
# reference, the kept graphs, the batched drafts of several sequences, greedy picks on the GPU
GPU_TESTS = ("tests/test_native.py", "tests/test_graphs.py", "tests/test_draft_seqs.py",
             "tests/test_backend_sampling.py")
# 9 minutes of wall time for the whole check, less room for the transfers and a slow start
DEFAULT_BUDGET_S = 480
# a measuring step that started within the budget may run this much past it, then is stopped
STEP_GRACE_S = 40
# On the device, the build and the random GGUFs go under build/ (ignored) in the tree: the
# device tool keeps ignored paths between calls to a warm machine, so a second run (after
# one cut short by the budget) builds and writes nothing again.
DEVICE_CACHE = ROOT / "build" / "cache"
WORK_DIR = ROOT / "build" / "gpu-check"


def make_carry(dest: Path, prebuilt: str | None = None, preset: int = 6) -> Path:
    """DIR/site (the packages the device lacks, imported from there through PYTHONPATH) and
    DIR/llama.cpp-src.tar.gz (the pristine llama.cpp tree: the device cannot download it);
    with `prebuilt` ("cuda:90", "cpu"), also DIR/builds/<key>.tar.xz, the build the check
    would make there (prebuilt_build). Made beside DIR and moved into place whole; an existing
    DIR is replaced only if it is a carry (or empty), never any other folder."""
    from .build import write_source_tarball
    dest = Path(dest)
    if dest.exists() and not (dest.is_dir() and (not any(dest.iterdir()) or (dest / CARRY_SOURCE).exists())):
        raise SystemExit(f"error: {dest} exists and is not a carry (no {CARRY_SOURCE} in it): "
                         "name a new or empty folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        site = tmp / "site"
        site.mkdir(parents=True)
        for name in CARRY_PACKAGES:
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.submodule_search_locations:
                raise SystemExit(f"error: package {name} is not installed here: run `make venv` first")
            pkg = Path(list(spec.submodule_search_locations)[0])
            # llama_cpp/lib is the library it was installed with (or a link to our build): the
            # check loads the one it builds (LLAMA_CPP_LIB_PATH), and a link would not travel
            skip = ("__pycache__", "lib") if name == "llama_cpp" else ("__pycache__",)
            shutil.copytree(pkg, site / name, symlinks=False, ignore=shutil.ignore_patterns(*skip))
        write_source_tarball(tmp / CARRY_SOURCE)
        if prebuilt:
            pack_build(prebuilt_build(prebuilt), tmp / CARRIED_BUILDS, preset=preset)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def prebuilt_build(spec: str) -> Path:
    """The finished build the device's check would make for `spec`, made here (or found in
    the cache): "cuda:ARCH" (ARCH a compute capability, "90" for the H100/H200; the CUDA
    toolkit must be here, cuBLAS may come from an nvidia-cublas wheel on PYTHONPATH, and a
    machine without the NVIDIA driver links against a stub of it), or "cpu"."""
    from . import build
    backend, _, arch = spec.partition(":")
    if backend == "cpu" and not arch:
        return build.build("cpu", progress=True)
    if backend != "cuda" or not arch.isdigit():
        raise OrthrusError(f"--prebuilt {spec!r}: give cuda:ARCH (ARCH the GPU's compute capability "
                           "without the dot, 90 for the H100/H200) or cpu")
    saved = dict(os.environ)
    try:
        os.environ.update(device_build_env(arch))
        if build._driver_library() is None:
            os.environ["ORTHRUS_GGUF_CUDA_DRIVER"] = str(build.write_driver_stub(build.cache_root() / "cuda-stub"))
        return build.build("cuda", progress=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _needed(f: Path) -> list[str] | None:
    """The shared libraries an ELF file needs by name (readelf -d), or None if it is no ELF."""
    with open(f, "rb") as fh:
        if fh.read(4) != b"\x7fELF":
            return None
    if shutil.which("readelf") is None:
        raise OrthrusError("readelf (binutils) is needed to pack a build for another machine")
    r = subprocess.run(["readelf", "-d", str(f)], capture_output=True, text=True, check=True)
    return [line.split("[", 1)[1].rstrip("]") for line in r.stdout.splitlines() if "(NEEDED)" in line]


def pack_build(lib_dir: Path, dest_dir: Path, preset: int = 6) -> Path:
    """A finished build (build.build's folder) as dest_dir/<its key>.tar.xz, with CARRIED_INFO
    added: the libraries each of its files needs by name. Written whole or not at all."""
    from . import build
    lib_dir = Path(lib_dir)
    info = build.build_info(lib_dir)
    if info is None or not (lib_dir / build.MARKER).is_file():
        raise OrthrusError(f"{lib_dir} holds no finished build (no {build.MARKER} and {build.INFO})")
    needs = {f.name: n for f in sorted(lib_dir.iterdir()) if f.is_file() and not f.is_symlink()
             and (n := _needed(f)) is not None}
    carried = {"key": info["key"], "made_on": platform.node(), "needs": needs}
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{info['key']}.tar.xz"
    tmp = dest.with_name(dest.name + ".part")
    try:
        with tarfile.open(tmp, "w:xz", preset=preset) as tar:
            for f in sorted(lib_dir.iterdir()):
                tar.add(f, arcname=f.name)
            data = json.dumps(carried, indent=2).encode()
            ti = tarfile.TarInfo(CARRIED_INFO)
            ti.size, ti.mtime, ti.mode = len(data), int(time.time()), 0o644
            tar.addfile(ti, io.BytesIO(data))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def unpack_carried(carry: Path, backend: str, log) -> Path | None:
    """The carried build of these inputs (carry/builds/<key>.tar.xz), put where build.build
    finds it, or None: no carried build, or only ones of other inputs (said in the log)."""
    from . import build
    tars = sorted((Path(carry) / CARRIED_BUILDS).glob("*.tar.xz"))
    if not tars:
        return None
    key = build.build_key(backend)
    want = Path(carry) / CARRIED_BUILDS / f"{key}.tar.xz"
    if want not in tars:
        log(f"carried build {', '.join(t.name for t in tars)}: not of these inputs ({key}), so not used")
        return None
    dest = build.build_dir(backend)
    if (dest / build.MARKER).is_file():  # a second run on a warm machine
        return dest
    staging = dest.with_name(f".{key}.carried{os.getpid()}")
    try:
        build.extract_tree(want, staging, prefix="")
        got = build.build_info(staging)
        if not (staging / build.MARKER).is_file() or got is None or got.get("key") != key:
            raise OrthrusError(f"{want} holds no finished build of {key}")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staging, dest)
    except (tarfile.TarError, OSError, ValueError) as e:
        raise OrthrusError(f"cannot unpack {want}: {e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"unpacked the carried build {want.name} into {dest}")
    return dest


def _runtime_search_dirs() -> list[Path]:
    """Where a CUDA runtime and cuBLAS may be when the loader does not find them: the
    toolkit's library folders, NVIDIA's wheels beside this Python (torch's), the driver's."""
    from . import build
    cuda_home = Path(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda")
    dirs = [cuda_home / "lib64", cuda_home / "lib", *sorted(cuda_home.glob("targets/*/lib"))]
    for d in build._search_dirs():
        dirs += sorted((d / "nvidia").glob("*/lib"))
    drv = build._driver_library()
    dirs += [drv.parent] if drv else []
    return [d for d in dirs if d.is_dir()]


def runtime_libraries(lib_dir: Path) -> list[Path]:
    """A carried build was linked elsewhere, so its files' RUNPATHs name that machine's
    folders. The libraries they need that the loader here does not find by itself (the CUDA
    runtime and cuBLAS, from the toolkit or torch's wheels) are looked for, loaded into this
    process by path (a later load of the build then finds them by name) and put on
    LD_LIBRARY_PATH for the child processes. Returns them; raises naming any found nowhere."""
    info = json.loads((Path(lib_dir) / CARRIED_INFO).read_text())
    ours = {p.name for p in Path(lib_dir).iterdir()}
    wanted = sorted({n for needs in info["needs"].values() for n in needs if n not in ours})
    found, missing, search = [], [], None
    for name in wanted:
        try:
            ctypes.CDLL(name)  # the loader finds it: the system's, or the driver's
            continue
        except OSError:
            pass
        search = _runtime_search_dirs() if search is None else search  # once: it runs ldconfig
        hit = next((d / name for d in search if (d / name).is_file()), None)
        if hit is None:
            missing.append(name)
            continue
        try:
            ctypes.CDLL(str(hit), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise OrthrusError(f"{hit} does not load: {e}") from None
        found.append(hit)
    if missing:
        raise OrthrusError(f"{', '.join(missing)} found neither by the loader nor in "
                           f"{', '.join(map(str, search)) or 'the CUDA toolkit or NVIDIA wheels'}")
    dirs = list(dict.fromkeys(str(h.parent) for h in found))
    if dirs:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(dirs + [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    return found


def probe(lib_dir: Path, backend: str) -> None:
    """In a child process: the build at lib_dir loads and, for a GPU backend, sees a GPU."""
    code = ("import sys; from orthrus_gguf import native; native.load()"
            + ("; sys.exit(0 if native._local_gpus() else 3)" if backend != "cpu" else ""))
    env = dict(os.environ, ORTHRUS_GGUF_LIB_DIR=str(lib_dir))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        what = ("loads but sees no GPU" if r.returncode == 3 else f"does not load (exit {r.returncode})"
                if r.returncode > 0 else f"crashes loading it ({signal.Signals(-r.returncode).name})")
        tail = " | ".join((r.stdout + r.stderr).strip().splitlines()[-4:])
        raise OrthrusError(what + (f": {tail}" if tail else ""))


def preflight() -> list[str]:
    """What the check needs and cannot import, each with where it should come from."""
    missing = [f"{m} (the device's python3 should have it)" for m in DEVICE_HAS if importlib.util.find_spec(m) is None]
    missing += [f"{m} (carried: make gpu-carry, then carry .carry)" for m in CARRY_PACKAGES
                if importlib.util.find_spec(m) is None]
    return missing


def link_convert() -> None:
    """orthrus_gguf.convert is the top-level convert/ folder (an install maps it, see
    pyproject.toml); in a bare copy of the tree a link makes it importable."""
    link = ROOT / "orthrus_gguf" / "convert"
    if importlib.util.find_spec("orthrus_gguf.convert") is None and (ROOT / "convert").is_dir():
        link.unlink(missing_ok=True)
        link.symlink_to(Path("..") / "convert")


class Log:
    def __init__(self, path: Path):
        self.f = open(path, "w")
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f} s] {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()


def _find(tool: str, *dirs: str) -> str | None:
    """tool on PATH, else in one of dirs (whose folder then joins PATH, for CMake too)."""
    found = shutil.which(tool)
    for d in dirs:
        if found is None and d and os.access(Path(d) / tool, os.X_OK):
            os.environ["PATH"] = f"{d}{os.pathsep}{os.environ.get('PATH', '')}"
            found = shutil.which(tool)
    return found


def detect_backend() -> str:
    """cuda where there is an NVIDIA GPU and nvcc (looked for off PATH too: a CPU run on a GPU
    machine would spend its lease for nothing), else cpu."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    if _find("nvidia-smi", "/usr/local/nvidia/bin", "/usr/bin") is None:
        return "cpu"
    if _find("nvcc", str(Path(cuda_home) / "bin")) is None:
        raise SystemExit("error: an NVIDIA GPU is here (nvidia-smi) but no nvcc: set CUDA_HOME to the "
                         "CUDA toolkit, or pass --backend cpu to measure the CPU")
    return "cuda"


def cuda_arch() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        return out[0].replace(".", "") if out else "native"
    except (OSError, subprocess.SubprocessError):
        return "native"


def device_build_env(arch: str) -> dict[str, str]:
    """What the check builds for a GPU of compute capability `arch` ("90"): that
    architecture's machine code only (no PTX to JIT, as the GPU is known), CPU code for any
    x86-64-v3 host rather than this one's (GGML_NATIVE=OFF: a build made elsewhere, --prebuilt,
    must run on the device's CPU, and the device's own build must have the same key), and
    only libllama and llama-quantize. Part of the build key, so one function makes both."""
    spec = f"{arch}-real" if arch.isdigit() else arch
    return {"ORTHRUS_GGUF_CMAKE_ARGS": f"-DCMAKE_CUDA_ARCHITECTURES={spec} -DGGML_NATIVE=OFF",
            "ORTHRUS_GGUF_TARGETS": "llama llama-quantize"}


def build_step(backend: str, log: Log) -> Path:
    from . import build
    if backend == "cuda":
        for k, v in device_build_env(cuda_arch()).items():
            os.environ.setdefault(k, v)
    src = ROOT / ".carry" / CARRY_SOURCE
    if src.is_file():
        os.environ.setdefault("ORTHRUS_GGUF_LLAMA_SRC", str(src))
    t0 = time.monotonic()
    try:
        unpack_carried(ROOT / ".carry", backend, log)
    except OrthrusError as e:
        log(f"{e}: building here")
    d = build.build(backend, jobs=os.cpu_count() or 2, progress=True)
    if (d / CARRIED_INFO).is_file():
        try:
            libs = runtime_libraries(d)
            probe(d, backend)
            log(f"the carried build works here{' with ' + ', '.join(map(str, libs)) if libs else ''}")
        except OrthrusError as e:
            log(f"the carried build does not work here ({e}): building here")
            shutil.rmtree(d)
            d = build.build(backend, jobs=os.cpu_count() or 2, progress=True)
    log(f"build {backend}: {time.monotonic() - t0:.0f} s, {d}")
    os.environ["ORTHRUS_GGUF_LIB_DIR"] = str(d)  # the tests' subprocesses load the same build
    return d


def test_step(ngl: int, log: Log, timeout_s: float) -> dict:
    env = dict(os.environ, ORTHRUS_TEST_GPU_LAYERS=str(ngl))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(1.0, timeout_s))
        rc, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        out = "".join(x if isinstance(x, str) else (x or b"").decode(errors="replace") for x in (e.stdout, e.stderr))
        out += f"\ntests stopped after {timeout_s:.0f} s (the check's budget)"
    tail = out.strip().splitlines()[-15:]
    for line in tail:
        log("  " + line)
    log(f"tests: exit {rc} in {time.monotonic() - t0:.0f} s")
    return {"returncode": rc, "tail": tail}


# widths of the host-argmax cost table (what backend sampling saves; a few suffice)
HOST_ARGMAX_WIDTHS = (1, 2, 4, 8, 16, 32)


def table_step(path: str, ngl: int, slots: int, backend_sampling, widths, rounds: int) -> dict:
    """One cost table (bench.cost_table) of the GGUF at path with `slots` kept graphs."""
    from .bench import cost_table, format_costs
    from .native import NativeModel
    with NativeModel(path, n_ctx=1024, n_batch=512, n_gpu_layers=ngl, backend_sampling=backend_sampling) as nm:
        nm.set_graph_slots(slots)
        t0 = time.monotonic()
        tab = cost_table(nm, [w for w in widths if w <= nm.block_size], rounds=rounds)
    print(f"{format_costs(tab)}\n({time.monotonic() - t0:.1f} s)", flush=True)
    return tab


def in_child(step: str, kwargs: dict, log: Log, timeout_s: float) -> dict:
    """CHILD_STEPS[step](**kwargs) in a child process, its output in the log: a CUDA error is
    an abort of the process (GGML_ABORT), and it must cost that step, not the check and the
    figures after it. A failure comes back as {"error": ...}; a child past timeout_s (the
    budget) is stopped with everything it started."""
    import tempfile
    import threading
    from .build import _kill_group
    fd, name = tempfile.mkstemp(prefix="gpu-check-", suffix=".json")
    os.close(fd)
    out = Path(name)
    cmd = [sys.executable, "-m", "orthrus_gguf.gpu_check", "--child", step, json.dumps(kwargs), str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=os.name == "posix")
    assert proc.stdout is not None
    tail: list[str] = []
    timer = None
    try:
        fired = threading.Event()
        timer = threading.Timer(max(1.0, timeout_s), lambda: (fired.set(), _kill_group(proc)))
        timer.start()
        for line in proc.stdout:
            log("  " + line.rstrip())
            tail = (tail + [line.rstrip()])[-5:]
        rc = proc.wait()
        timed_out = fired.is_set()
    except BaseException:
        _kill_group(proc)
        out.unlink(missing_ok=True)
        raise
    finally:
        if timer is not None:
            timer.cancel()
    try:
        if rc == 0 and out.stat().st_size:
            return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)
    why = (f"stopped after {timeout_s:.0f} s (the check's budget)" if timed_out
           else f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited {rc}")
    log(f"{step} failed: {why}")
    return {"error": f"{step} {why}", "tail": tail}


def cost_step(name: str, path: Path, ngl: int, widths, rounds: int, log: Log, backend_sampling=None,
              timeout_s: float = 3600.0) -> dict:
    """One model's cost table with kept graphs and with upstream's single graph, both as
    greedy decoding runs (backend sampling where offloaded, or as `backend_sampling` says);
    then, if that had backend sampling, the kept graphs again at a few widths with the logits
    sent to the host's argmax: what backend sampling saves. Each table in its own child."""
    out = {}
    t_end = time.monotonic() + timeout_s

    def run(key: str, slots: int, backend_sampling, ws) -> None:
        log(f"costs {name}, {key}:")
        out[key] = in_child("table", dict(path=str(path), ngl=ngl, slots=slots, backend_sampling=backend_sampling,
                                          widths=[w for w in widths if w in ws], rounds=rounds),
                            log, t_end - time.monotonic())

    run("kept_graphs", 16, backend_sampling, widths)
    run("single_graph", 0, backend_sampling, widths)
    if out["kept_graphs"].get("backend_sampling"):
        run("host_argmax", 16, False, HOST_ARGMAX_WIDTHS)
    return out


def prefill_step(path: str) -> dict:
    """bench.prefill_speed with every layer on the CPU: the exact modes' prompt tokens/s."""
    from .bench import prefill_speed
    from .native import NativeModel
    with NativeModel(path, n_ctx=1024, n_batch=512, n_gpu_layers=0) as nm:
        r = prefill_speed(nm)
    print(f"prefill of {r['tokens']} tokens, layers on the CPU: {r['fast_tokens_per_second']:.0f} tok/s off, "
          f"{r['exact_tokens_per_second']:.0f} verify ({r['exact_over_fast']:.3f}x), "
          f"{r['reference_kernels_tokens_per_second']:.0f} all", flush=True)
    return r


def demo_step(outtypes, max_tokens: int, ngl: int, max_prompts) -> dict:
    from .demo import run_demo
    return run_demo(tuple(outtypes), max_tokens, n_gpu_layers=ngl, max_prompts=max_prompts)


# what in_child runs (`--child STEP KWARGS OUT`)
CHILD_STEPS = {"table": table_step, "prefill": prefill_step, "demo": demo_step}


def random_model(shape: str, log: Log) -> Path:
    """The random q4_k_m GGUF of a published shape (testing.write_random_gguf), kept in
    ORTHRUS_GPU_CHECK_DIR (default build/gpu-check) for a second run."""
    from .testing import write_random_gguf
    work = Path(os.environ.get("ORTHRUS_GPU_CHECK_DIR") or WORK_DIR)
    work.mkdir(parents=True, exist_ok=True)
    p = work / f"random-{shape}-q4_k_m.gguf"
    if not p.is_file():
        t0 = time.monotonic()
        write_random_gguf(p, shape)
        log(f"wrote {p.name} in {time.monotonic() - t0:.0f} s")
    return p


def pair(tab: dict, w: int) -> float | None:
    row = next((r for r in tab.get("rows", ()) if r["width"] == w), None)
    return row["pair_alternating"] if row else None


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    costs = report.get("costs", {})
    fig, axes = plt.subplots(1, max(1, len(costs)) + 1, figsize=(5 * (len(costs) + 1), 4))
    for ax, (name, tabs) in zip(axes, costs.items()):
        for key, style in (("kept_graphs", "-"), ("single_graph", "--")):
            rows = tabs.get(key, {}).get("rows")
            if not rows:  # that step failed (its error is in the report)
                continue
            w = [r["width"] for r in rows]
            ax.plot(w, [r["pair_alternating"] for r in rows], style, marker=".", label=f"draft+verify, {key}")
            ax.plot(w, [r["verify"] for r in rows], style, alpha=0.5, label=f"verify, {key}")
            if key == "kept_graphs" and all("argmax" in r for r in rows):
                where = "token ids read" if tabs[key].get("backend_sampling") else "host argmax"
                ax.plot(w, [r["argmax"] for r in rows], ":", label=f"{where}, w rows")
        if tabs.get("host_argmax", {}).get("rows") and tabs["kept_graphs"].get("rows"):  # the same forwards with their logits to the host, in
            unit = tabs["kept_graphs"]["unit_s"]  # the kept graphs' unit: one plot, one scale
            rows = tabs["host_argmax"]["rows"]
            ax.plot([r["width"] for r in rows], [(r["pair_alternating_s"] + 2 * r["argmax_s"]) / unit for r in rows],
                    "s:", label="draft+verify with logits to the host, + 2 host argmaxes")
        ax.set(title=name, xlabel="width w", ylabel="one-token forwards", ylim=(0, None))
        ax.legend(fontsize=7)
    ax = axes[-1]
    labels, vals = [], []
    for ot, rep in report.get("demo", {}).items():
        for group, g in (rep.get("groups", {}) if isinstance(rep, dict) else {}).items():
            for b, o in g["orthrus"].items():
                labels.append(f"{ot}\n{group}\nB={b}")
                vals.append(o["speedup"])
    ax.bar(range(len(vals)), vals, color="#2a7")
    ax.axhline(1.0, color="#888", linestyle=":")
    ax.set_xticks(range(len(vals)), labels, fontsize=6)
    ax.set(title=f"orthrus-tiny, {report['backend']}: speed × AR", ylabel="× AR")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "out/gpu-check")
    ap.add_argument("--backend", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--quick", action="store_true", help="small sizes: the CPU path's test")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="S",
                    help=f"seconds the whole check may take (default {DEFAULT_BUDGET_S}); steps that "
                         "would start later are skipped and listed in the report")
    ap.add_argument("--make-carry", type=Path, metavar="DIR",
                    help="write what the device lacks into DIR (packages, llama.cpp source) and stop")
    ap.add_argument("--prebuilt", metavar="SPEC",
                    help="with --make-carry: also build here what the device would build and carry it "
                         "(cuda:90 for an H100/H200, or cpu), so that the device compiles nothing")
    ap.add_argument("--child", nargs=3, metavar=("STEP", "KWARGS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a timeout: unwind, so the report is written
        signal.signal(sig, raise_signal)
    if args.child:  # one step of in_child: its result as JSON into OUT
        step, kwargs, out = args.child
        result = CHILD_STEPS[step](**json.loads(kwargs))
        Path(out).write_text(json.dumps(result, default=str))
        return 0
    if args.prebuilt and not args.make_carry:
        ap.error("--prebuilt goes with --make-carry DIR")
    if args.make_carry:
        try:
            d = make_carry(args.make_carry, prebuilt=args.prebuilt)
        except OrthrusError as e:
            raise SystemExit(f"error: {e}") from None
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        builds = [f.name for f in (d / CARRIED_BUILDS).glob("*.tar.xz")]
        print(f"wrote {d}: {', '.join(CARRY_PACKAGES)}, {CARRY_SOURCE}"
              + (f" and the build {builds[0]}" if builds else "") + f", {size / 2**20:.1f} MiB")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    t_start = time.monotonic()
    backend = detect_backend() if args.backend == "auto" else args.backend
    ngl = -1 if backend == "cuda" else 0
    report = {"backend": backend, "host": platform.node(), "cpus": os.cpu_count(), "quick": args.quick,
              "budget_s": args.budget, "targets": TARGETS, "met": {}, "skipped": []}

    def save() -> None:
        report["wall_s"] = round(time.monotonic() - t_start, 1)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))

    def left() -> float:
        return args.budget - (time.monotonic() - t_start)

    def may_start(step: str) -> bool:
        if left() > 0:
            return True
        report["skipped"].append(step)
        log(f"skipped {step}: the budget of {args.budget:.0f} s is spent")
        return False

    missing = preflight()
    if missing:
        report["error"] = "missing Python packages: " + "; ".join(missing)
        save()
        log(f"error: {report['error']}")
        return 2
    link_convert()
    if backend == "cuda":
        os.environ.setdefault("ORTHRUS_GGUF_CACHE", str(DEVICE_CACHE))
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        report["gpu"] = smi.stdout.strip()
        log(f"gpu: {report['gpu']}")
    try:
        build_step(backend, log)
        save()
        if not args.skip_tests and may_start("tests"):
            report["tests"] = test_step(ngl, log, timeout_s=left())
            save()
        from .demo import converted, embedded_model
        widths = (1, 2, 4, 8) if args.quick else tuple(range(1, 33))
        # the tiny model first: cheap, and it anchors the rest; each model is made (the 8B
        # shape is 4.7 GB) only when its step starts. The tiny one serves two steps (its costs,
        # the prefill), so its conversion is found once, not hashed again
        models = [("orthrus-tiny f16", functools.cache(lambda: converted(embedded_model(), "f16")))]
        if not args.quick:
            models += [(f"random {shape} q4_k_m", lambda shape=shape: random_model(shape, log))
                       for shape in ("1.7b", "8b")]
        report["costs"] = {}
        for i, (name, make) in enumerate(models):
            if may_start(f"costs {name}"):
                report["costs"][name] = cost_step(name, make(), ngl, widths, rounds=2 if args.quick else 3, log=log,
                                                  timeout_s=left() + STEP_GRACE_S)
                save()
            if i == 0 and may_start("prefill with CPU layers"):  # cheap, after the tiny model
                report["prefill_cpu_layers"] = in_child("prefill", {"path": str(make())}, log, left() + STEP_GRACE_S)
                save()
        for name, key in (("random 1.7b q4_k_m", "1.7b_pair16_max"), ("random 8b q4_k_m", "8b_pair16_max")):
            if name in report["costs"]:
                v = pair(report["costs"][name]["kept_graphs"], 16)
                report["met"][key] = {"value": v, "met": v is not None and v <= TARGETS[key]}
        if may_start("demo"):
            log("demo …")
            demo = in_child("demo", dict(outtypes=["f16"] if args.quick else ["f16", "q4_k_m"],
                                         max_tokens=16 if args.quick else 96, ngl=ngl,
                                         max_prompts=2 if args.quick else None), log, left() + STEP_GRACE_S)
            report["demo"] = demo
            if "error" not in demo:
                speed = [o["speedup"] for g in demo["f16"]["groups"].values() for b, o in g["orthrus"].items()
                         if b == "auto"]
                report["met"]["tiny_auto_speedup_min"] = {"value": min(speed),
                                                          "met": min(speed) >= TARGETS["tiny_auto_speedup_min"]}
        if backend != "cuda":
            report["met"] = {k: dict(v, note="CPU run: the targets are for the GPU") for k, v in report["met"].items()}
    except BaseException as e:  # recorded, then re-raised: a report says how far it got
        report["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        save()
        if report.get("costs"):
            try:
                plot(report, out / "gpu_check.png")
            except Exception as e:  # a plot must not cost the figures
                log(f"plot failed: {type(e).__name__}: {e}")
        log(f"wrote {out / 'gpu_check.json'} after {report['wall_s']:.0f} s")
    for k, v in report["met"].items():
        log(f"target {k}: {v['value']} -> {'met' if v['met'] else 'NOT met'}")
    return 0 if report.get("tests", {}).get("returncode", 0) == 0 else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Signalled as e:
        sys.exit(128 + e.signum)
