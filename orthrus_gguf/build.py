"""`orthrus-gguf build`: the patched llama.cpp, built once per set of inputs and cached.

Inputs: the llama.cpp tree vendored in the pinned llama-cpp-python sdist (so its ctypes
layouts match the library), the patch series in patches/ and the new sources in native/.
The build lands in <cache>/llama.cpp/<key>/, key = short sha256 of all inputs and flags;
a `.done` marker written last makes a second run with nothing changed a no-op.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from .errors import OrthrusError

try:
    import fcntl
except ImportError:  # Windows: no lock between concurrent builds
    fcntl = None

LLAMA_CPP_PYTHON = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_TREE = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"

# the server and the quantizer, the tools users benchmark, evaluate and calibrate with, and
# the RPC server that runs part of a model on another machine
BINARIES = ("llama-server", "llama-quantize", "llama-cli", "llama-bench", "llama-perplexity",
            "llama-imatrix", "ggml-rpc-server")
TARGETS = ("llama", *BINARIES)
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_RPC=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
    # binaries find libllama/libggml beside them, in the build tree and once installed
    "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",
)
BACKENDS = {
    "cpu": (),
    "cuda": ("-DGGML_CUDA=ON",),
    "metal": ("-DGGML_METAL=ON",),
    "vulkan": ("-DGGML_VULKAN=ON",),
}
# bump when the recipe below changes in a way the inputs do not show
RECIPE = 1
MARKER = ".done"
INFO = "build-info.json"  # what a finished build was made from, beside its libraries


# ------------------------------------------------------------------ locations

def cache_root() -> Path:
    """ORTHRUS_GGUF_CACHE, else $XDG_CACHE_HOME/orthrus-gguf, else ~/.cache/orthrus-gguf."""
    if os.environ.get("ORTHRUS_GGUF_CACHE"):
        return Path(os.environ["ORTHRUS_GGUF_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "orthrus-gguf"


def data_root() -> Path:
    """The directory holding patches/ and native/: the repository (editable install) or
    orthrus_gguf/_native_data in a wheel that packs them."""
    here = Path(__file__).resolve().parent
    for root in (here.parent, here / "_native_data"):
        if (root / "patches").is_dir() and (root / "native").is_dir():
            return root
    raise OrthrusError(
        f"patches/ and native/ not found next to {here} (looked in {here.parent} and "
        f"{here / '_native_data'}): the installation is incomplete; reinstall orthrus-gguf "
        "(a wheel or sdist carries them) or run from a clone of the repository")


def patch_files(root: Path | None = None) -> list[Path]:
    """The patch series, applied in name order (NNNN-slug.patch)."""
    root = root or data_root()
    patches = sorted((root / "patches").glob("*.patch"))
    if not patches:
        raise OrthrusError(f"no patches in {root / 'patches'}: the checkout is incomplete")
    return patches


def native_files(root: Path | None = None) -> list[tuple[Path, str]]:
    """(file, path inside the llama.cpp tree) for every source file under native/."""
    root = root or data_root()
    base = root / "native"
    out = []
    for f in sorted(base.rglob("*")):
        rel = f.relative_to(base).as_posix()
        # the docs beside the sources (native/README.md, native/SERVER.md) are no build input
        if f.is_file() and not (f.suffix == ".md" and "/" not in rel) and "__pycache__" not in rel:
            out.append((f, rel))
    return out


def extra_flags() -> tuple[str, ...]:
    """ORTHRUS_GGUF_CMAKE_ARGS: more CMake flags (e.g. -DCMAKE_CUDA_ARCHITECTURES=90), part of the key."""
    return tuple(os.environ.get("ORTHRUS_GGUF_CMAKE_ARGS", "").split())


def backend_flags(backend: str) -> tuple[str, ...]:
    if backend not in BACKENDS:
        raise OrthrusError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    return CMAKE_FLAGS + BACKENDS[backend] + extra_flags()


def build_targets() -> tuple[str, ...]:
    """ORTHRUS_GGUF_TARGETS (space-separated) narrows the targets (a device check needs no
    server); part of the key, so such a build never stands in for a full one."""
    wanted = tuple(os.environ.get("ORTHRUS_GGUF_TARGETS", "").split())
    unknown = [t for t in wanted if t not in TARGETS]
    if unknown:
        raise OrthrusError(f"ORTHRUS_GGUF_TARGETS names {', '.join(unknown)}; choose among {', '.join(TARGETS)}")
    return wanted or TARGETS


def build_key(backend: str = "cpu", root: Path | None = None) -> str:
    """Short sha256 of everything the build depends on."""
    root = root or data_root()
    h = hashlib.sha256()
    targets = () if build_targets() == TARGETS else (f"targets={' '.join(build_targets())}",)
    for part in (f"recipe={RECIPE}", f"commit={LLAMA_CPP_COMMIT}", f"sdist={SDIST_SHA256}",
                 f"backend={backend}", *backend_flags(backend), *targets):
        h.update(part.encode() + b"\0")
    for p in patch_files(root):
        h.update(b"patch\0" + p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    for f, rel in native_files(root):
        h.update(b"native\0" + rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return f"{backend}-{h.hexdigest()[:16]}"


def build_dir(backend: str = "cpu") -> Path:
    """Where the build of the current inputs for `backend` lives (finished or not)."""
    return cache_root() / "llama.cpp" / build_key(backend)


def library_dir(backend: str | None = None) -> Path | None:
    """The directory with libllama of a finished build of the current inputs, or None.

    ORTHRUS_GGUF_LIB_DIR overrides the lookup. Without a backend, the first finished one of
    ORTHRUS_GGUF_BACKEND, cuda, metal, vulkan, cpu is taken."""
    if os.environ.get("ORTHRUS_GGUF_LIB_DIR"):
        return Path(os.environ["ORTHRUS_GGUF_LIB_DIR"]).expanduser()
    if backend is None:
        wanted = os.environ.get("ORTHRUS_GGUF_BACKEND")
        order = [wanted] if wanted else ["cuda", "metal", "vulkan", "cpu"]
    else:
        order = [backend]
    for b in order:
        d = build_dir(b)
        if (d / MARKER).is_file():
            return d
    return None


def build_info(lib_dir: str | Path) -> dict | None:
    """The build-info.json of a finished build in lib_dir, or None where there is none (a build
    dir given by ORTHRUS_GGUF_LIB_DIR)."""
    info = Path(lib_dir) / INFO
    return json.loads(info.read_text()) if info.is_file() else None


def binary(name: str, needed_for: str) -> Path:
    """A program (llama-server, llama-quantize) of the finished build of the current inputs."""
    d = library_dir()
    exe = d / name if d is not None else None
    if exe is None or not exe.is_file():
        raise OrthrusError(f"{name} of the patched llama.cpp is not built: run `orthrus-gguf build` "
                           f"(or point ORTHRUS_GGUF_LIB_DIR at a directory holding it); {needed_for}")
    return exe


# ------------------------------------------------------------------ steps

def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"orthrus-gguf build: {msg}", flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist(progress: bool = True) -> Path:
    """The pinned llama-cpp-python sdist, from the cache or `pip download`, sha256-checked.

    ORTHRUS_GGUF_SDIST may name a local copy of the tarball (offline machines)."""
    cached = cache_root() / "sdist" / SDIST_NAME
    candidates = [Path(os.environ["ORTHRUS_GGUF_SDIST"])] if os.environ.get("ORTHRUS_GGUF_SDIST") else []
    candidates.append(cached)
    for c in candidates:
        if c.is_file():
            if _sha256(c) == SDIST_SHA256:
                if c != cached:
                    _install_file(c, cached)
                return cached
            _say(progress, f"{c} has the wrong sha256, ignoring it")
    _say(progress, f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON} sdist with pip")
    with tempfile.TemporaryDirectory(prefix="orthrus-sdist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SDIST_NAME
        if r.returncode != 0 or not got.is_file():
            raise OrthrusError(
                f"could not download the llama-cpp-python {LLAMA_CPP_PYTHON} sdist "
                f"({' '.join(cmd)} exited {r.returncode}): {r.stderr.strip()[-800:]}\n"
                f"offline? put {SDIST_NAME} (sha256 {SDIST_SHA256}) at {cached} "
                "or point ORTHRUS_GGUF_SDIST at it")
        digest = _sha256(got)
        if digest != SDIST_SHA256:
            raise OrthrusError(f"downloaded {SDIST_NAME} has sha256 {digest}, expected {SDIST_SHA256}: "
                               "refusing to build from an unverified source")
        _install_file(got, cached)
    return cached


def _install_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _tree_members(tar: tarfile.TarFile, prefix: str):
    """The members under `prefix`, renamed relative to it (the prefix itself left out)."""
    for m in tar.getmembers():
        if m.name.startswith(prefix) and m.name[len(prefix):]:
            m.name = m.name[len(prefix):]
            # a long name came in a PAX record, which would win over the new name when the
            # member is written out again (write_source_tarball)
            m.pax_headers.pop("path", None)
            yield m


def extract_tree(sdist: Path, dest: Path, prefix: str = SDIST_TREE) -> None:
    """The llama.cpp tree under `prefix` of a tarball (vendor/llama.cpp of the sdist) into dest (replaced)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if not Path(sdist).is_file():
        raise OrthrusError(f"{sdist}: no such tarball of the llama.cpp source")
    with tarfile.open(sdist, "r:*") as tar:
        members = list(_tree_members(tar, prefix))
        if not members:
            raise OrthrusError(f"{sdist} holds no {prefix or 'files'}: not the expected source tarball")
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **kw)
    # the submodule's .git file points outside the tarball; the tree becomes its own repo
    git_file = dest / ".git"
    if git_file.is_file() or git_file.is_symlink():
        git_file.unlink()


# what a build needs none of: vocab test models, documentation, media
_SOURCE_SKIP = ("models/", "docs/", "media/", ".github/", "benches/")


def write_source_tarball(dest: str | Path) -> Path:
    """The pristine llama.cpp tree of the pinned sdist, less what a build needs none of, as a
    tar.gz for an offline machine (ORTHRUS_GGUF_LLAMA_SRC): small enough to carry."""
    dest = Path(dest)
    sdist = fetch_sdist(progress=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with tarfile.open(sdist, "r:gz") as src, tarfile.open(tmp, "w:gz") as out:
            for m in _tree_members(src, SDIST_TREE):
                if not m.name.startswith(_SOURCE_SKIP) and m.name != ".git":
                    out.addfile(m, src.extractfile(m) if m.isfile() else None)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def copy_native(tree: Path, root: Path | None = None) -> None:
    for f, rel in native_files(root):
        dst = tree / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)


def apply_patches(tree: Path, root: Path | None = None, progress: bool = True) -> None:
    patches = patch_files(root)
    use_git = shutil.which("git") is not None
    if use_git and not (tree / ".git").exists():
        # a repo of its own, so that git apply never resolves paths against an outer one
        subprocess.run(["git", "init", "-q", str(tree)], check=True)
    for p in patches:
        _say(progress, f"applying {p.name}")
        if use_git:
            cmd = ["git", "apply", "--whitespace=nowarn", str(p)]
        elif shutil.which("patch"):
            cmd = ["patch", "-p1", "--forward", "--batch", "-i", str(p)]
        else:
            raise OrthrusError("neither git nor patch is installed: install git to build")
        r = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
        if r.returncode != 0:
            raise OrthrusError(
                f"patch {p} does not apply to llama.cpp {LLAMA_CPP_COMMIT} "
                f"(llama-cpp-python {LLAMA_CPP_PYTHON}):\n{(r.stderr or r.stdout).strip()[-2000:]}\n"
                f"to recover: the patch series must be made against that tree; rebase {p.name} "
                "in a git repo of the pristine tree (git am patches/*.patch, fix, "
                "git format-patch), or restore patches/ from git if it was edited by mistake")


def _env(tree: Path) -> dict[str, str]:
    # ccache sees paths relative to the tree, so builds in other directories hit too
    return dict(os.environ, CCACHE_BASEDIR=str(tree))


def _configure(tree: Path, build: Path, backend: str, progress: bool) -> None:
    cmd = ["cmake", "-S", str(tree), "-B", str(build), *backend_flags(backend)]
    if shutil.which("ninja"):
        cmd += ["-G", "Ninja"]
    ccache = shutil.which("ccache")
    if ccache:
        cmd += [f"-DCMAKE_C_COMPILER_LAUNCHER={ccache}", f"-DCMAKE_CXX_COMPILER_LAUNCHER={ccache}"]
        if backend == "cuda":
            cmd += [f"-DCMAKE_CUDA_COMPILER_LAUNCHER={ccache}"]
    _say(progress, "configuring: " + " ".join(cmd[5:]))
    log = build.parent.parent / "configure.log"
    try:
        _run_logged(cmd, log, _env(tree), progress=False)
    except OrthrusError:
        if backend != "cuda":
            raise
        # a toolkit without cuBLAS or libcuda (pip-assembled): fill in what is missing, once
        flags, missing = cuda_completion(_cmake_cache(build), _search_dirs(), _driver_library(),
                                         build.parent.parent / "cuda-overlay")
        if missing:
            raise OrthrusError("cannot configure the CUDA backend: missing " + "; ".join(missing)
                               + f"; full log: {log}") from None
        if not flags:
            raise
        _say(progress, "the CUDA toolkit lacks cuBLAS or libcuda; configuring again with " + " ".join(flags))
        _run_logged(cmd + flags, log, _env(tree), progress=False)


def _cmake_cache(build: Path) -> dict[str, str]:
    """NAME -> value of a build directory's CMakeCache.txt (empty if there is none), and
    CMAKE_CUDA_COMPILER_VERSION from the compiler check, which the cache does not hold."""
    out = {}
    try:
        text = (build / "CMakeCache.txt").read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z_][\w.+-]*):[A-Z]+=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    for f in sorted(build.glob("CMakeFiles/*/CMakeCUDACompiler.cmake")):
        m = re.search(r'set\(CMAKE_CUDA_COMPILER_VERSION "([\d.]+)"\)', f.read_text(errors="replace"))
        if m:
            out["CMAKE_CUDA_COMPILER_VERSION"] = m.group(1)
    return out


def _search_dirs() -> list[Path]:
    """Where this Python keeps packages (NVIDIA's CUDA wheels install under nvidia/ there)."""
    import site
    dirs = [*sys.path, *site.getsitepackages(), site.getusersitepackages()]
    seen, out = set(), []
    for d in dirs:
        if d and d not in seen and Path(d).is_dir():
            seen.add(d)
            out.append(Path(d))
    return out


def _driver_library() -> Path | None:
    """The NVIDIA driver's libcuda.so.1, where the dynamic linker or the container puts it;
    ORTHRUS_GGUF_CUDA_DRIVER names one first (a machine without the driver building for one
    that has it links against a stub: write_driver_stub). No part of the key: what the
    library is linked against at build time is found again by name where it runs."""
    if os.environ.get("ORTHRUS_GGUF_CUDA_DRIVER"):
        return Path(os.environ["ORTHRUS_GGUF_CUDA_DRIVER"])
    try:
        r = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30)
        for line in r.stdout.splitlines():
            name, _, path = line.strip().partition(" => ")
            if name.startswith("libcuda.so.1 ") and Path(path).is_file():
                return Path(path)
    except (OSError, subprocess.SubprocessError):
        pass
    for d in ("/usr/local/nvidia/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib/wsl/lib",
              "/usr/lib/aarch64-linux-gnu"):
        if (Path(d) / "libcuda.so.1").is_file():
            return Path(d) / "libcuda.so.1"
    return None


# the CUDA driver API calls of ggml-cuda at the pinned commit (its VMM pool and the device's
# attributes); a test checks this list against the pinned tree's sources
CUDA_DRIVER_CALLS = ("cuDeviceGet", "cuDeviceGetAttribute", "cuGetErrorString", "cuMemAddressFree",
                     "cuMemAddressReserve", "cuMemCreate", "cuMemGetAllocationGranularity", "cuMemMap",
                     "cuMemRelease", "cuMemSetAccess", "cuMemUnmap")
CUDA_ERROR_STUB_LIBRARY = 34  # what every call of the stub returns (cuda.h's own code for it)


def write_driver_stub(dest_dir: str | Path) -> Path:
    """dest_dir/libcuda.so.1: a stand-in for the NVIDIA driver's library with ggml-cuda's
    driver calls, each failing with CUDA_ERROR_STUB_LIBRARY, so that a machine without the
    driver can link the CUDA backend (libggml-cuda then needs libcuda.so.1 by name, the
    driver's own where it runs). Needs a C compiler."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise OrthrusError("no C compiler (cc, gcc, clang) to build a libcuda stub with")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    src = dest / "libcuda-stub.c"
    src.write_text("/* written by orthrus_gguf.build.write_driver_stub: not the NVIDIA driver */\n"
                   + "".join(f"int {name}(void) {{ return {CUDA_ERROR_STUB_LIBRARY}; }}\n"
                             for name in CUDA_DRIVER_CALLS))
    out = dest / "libcuda.so.1"
    r = subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(out), str(src)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise OrthrusError(f"could not build the libcuda stub with {cc}: {r.stderr.strip()[-800:]}")
    return out


def cuda_completion(cache: dict[str, str], search: list[Path], driver: Path | None,
                    overlay: Path) -> tuple[list[str], list[str]]:
    """A CUDA toolkit assembled from NVIDIA's pip wheels (nvcc and the runtime, as on this
    project's machines) may have no cuBLAS and no libcuda stub, so ggml-cuda's CMake finds no
    CUDA::cublas or CUDA::cuda_driver. From the first configure's cache: (-D flags that
    supply what is missing, what is still missing). cuBLAS comes from an nvidia-cublas wheel
    of the toolkit's major version beside this Python (torch brings one); its headers are
    linked into `overlay`/include; libcuda is the driver's own (`driver`)."""
    flags, missing = [], []
    version = cache.get("CMAKE_CUDA_COMPILER_VERSION") or ""
    major = version.split(".")[0] if version else ""
    if cache.get("CUDA_cublas_LIBRARY", "").endswith("NOTFOUND"):
        libs = {}
        for d in search:
            for sub in ("nvidia/cu" + major, "nvidia/cublas") if major else ("nvidia/cublas",):
                lib = d / sub / "lib"
                hit = sorted(lib.glob(f"libcublas.so.{major or '*'}")) if lib.is_dir() else []
                lt = sorted(lib.glob(f"libcublasLt.so.{major or '*'}")) if lib.is_dir() else []
                if hit and lt and (d / sub / "include" / "cublas_v2.h").is_file():
                    libs = {"cublas": hit[0], "cublasLt": lt[0], "include": d / sub / "include"}
                    break
            if libs:
                break
        if libs:
            inc = overlay / "include"
            if inc.exists():
                shutil.rmtree(inc)
            inc.mkdir(parents=True)
            for h in sorted(libs["include"].glob("cublas*.h")):
                (inc / h.name).symlink_to(h)
            flags += [f"-DCUDA_cublas_LIBRARY={libs['cublas']}", f"-DCUDA_cublasLt_LIBRARY={libs['cublasLt']}",
                      f"-DCMAKE_CUDA_STANDARD_INCLUDE_DIRECTORIES={inc}"]
        else:
            missing.append(f"cuBLAS (no libcublas in the toolkit, nor an nvidia-cublas {major or ''} wheel "
                           "beside this Python: install the toolkit's cuBLAS, or `pip install "
                           f"nvidia-cublas`, or pass -DCUDA_cublas_LIBRARY=… in ORTHRUS_GGUF_CMAKE_ARGS)")
    if cache.get("CUDA_cuda_driver_LIBRARY", "").endswith("NOTFOUND") and cache.get("GGML_CUDA_NO_VMM") != "ON":
        if driver is not None:
            flags.append(f"-DCUDA_cuda_driver_LIBRARY={driver}")
        else:
            missing.append("libcuda (the NVIDIA driver's library: not in the toolkit's stubs nor beside "
                           "the driver; on a machine without the driver, pass -DGGML_CUDA_NO_VMM=ON or "
                           "-DCUDA_cuda_driver_LIBRARY=… in ORTHRUS_GGUF_CMAKE_ARGS)")
    return flags, missing


def _compile(tree: Path, build: Path, jobs: int, progress: bool) -> None:
    targets = build_targets()
    cmd = ["cmake", "--build", str(build), "-j", str(jobs), "--target", *targets]
    _say(progress, f"compiling {', '.join(targets)} with {jobs} jobs (first build: minutes)")
    _run_logged(cmd, build.parent.parent / "build.log", _env(tree), progress=progress)


_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")


def _run_logged(cmd: list[str], log: Path, env: dict[str, str], progress: bool) -> None:
    """Run cmd, tee its output to log, stream [n/N] lines; raise with the tail on failure."""
    tail: list[str] = []
    tty = progress and sys.stdout.isatty()
    with open(log, "w") as f:
        # its own process group, so that an interrupted build takes cmake, ninja and every
        # compiler with it (a signal to this process alone would orphan them)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, env=env, start_new_session=os.name == "posix")
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                f.write(line)
                tail = (tail + [line.rstrip()])[-60:]
                if progress:
                    m = _NINJA_STEP.match(line)
                    if m and tty:
                        sys.stdout.write("\r\033[K" + line.rstrip()[:150])
                        sys.stdout.flush()
                    elif m:
                        print(line.rstrip()[:200], flush=True)
            rc = proc.wait()
        except BaseException:
            _kill_group(proc)
            raise
    if tty:
        print()
    if rc != 0:
        raise OrthrusError(f"{' '.join(cmd[:3])} … failed (exit {rc}); full log: {log}\n"
                           + "\n".join(tail[-40:]))


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop a child started in its own session and everything it started."""
    import signal
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig) if os.name == "posix" else proc.kill()
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _install(build: Path, dest: Path) -> None:
    """libllama, libggml* (with their soname links) and the binaries into dest."""
    bindir = build / "bin"
    names = [p for p in bindir.iterdir()
             if re.match(r"lib(llama|ggml|mtmd)[\w-]*\.(so|dylib)", p.name)
             or p.name in BINARIES]
    if not any(p.name.startswith("libllama.") for p in names):
        raise OrthrusError(f"the build finished but {bindir} has no libllama: see {build.parent.parent / 'build.log'}")
    for p in names:
        target = dest / p.name
        if p.is_symlink():
            os.symlink(os.readlink(p), target)
        else:
            shutil.copy2(p, target)


# ------------------------------------------------------------------ entry point

def build(backend: str = "cpu", jobs: int | None = None, force: bool = False,
          progress: bool = True) -> Path:
    """Build (or find) the patched llama.cpp for `backend`; returns the library directory."""
    root = data_root()
    key = build_key(backend, root)
    llama_root = cache_root() / "llama.cpp"
    dest = llama_root / key
    if not force and (dest / MARKER).is_file():
        _say(progress, f"up to date: {dest}")
        return dest
    for tool in ("cmake",):
        if shutil.which(tool) is None:
            raise OrthrusError(f"{tool} not found: install CMake (>= 3.14) and a C++17 compiler to build")

    llama_root.mkdir(parents=True, exist_ok=True)
    with open(llama_root / ".lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time per cache
        if not force and (dest / MARKER).is_file():  # another process just built it
            return dest
        t0 = time.monotonic()
        # a stable work path per backend: ccache hits across keys, incremental rebuilds
        work = llama_root / f"work-{backend}"
        tree = work / "llama.cpp"
        src = os.environ.get("ORTHRUS_GGUF_LLAMA_SRC")
        if src:  # an offline machine: a tarball of the pristine tree (make gpu-carry writes one)
            _say(progress, f"extracting llama.cpp {LLAMA_CPP_COMMIT} from {src} into {tree}")
            extract_tree(Path(src), tree, prefix="")
        else:
            sdist = fetch_sdist(progress)
            _say(progress, f"extracting llama.cpp {LLAMA_CPP_COMMIT} into {tree}")
            extract_tree(sdist, tree)
        copy_native(tree, root)
        apply_patches(tree, root, progress)
        bdir = tree / "build"
        try:
            _configure(tree, bdir, backend, progress)
        except OrthrusError as e:
            # a backend this machine cannot build (no toolkit): keep its log, not its tree
            kept = llama_root / f"configure-{backend}-failed.log"
            if (work / "configure.log").is_file():
                shutil.copy2(work / "configure.log", kept)
            shutil.rmtree(work, ignore_errors=True)
            raise OrthrusError(str(e).replace(str(work / "configure.log"), str(kept))) from None
        _compile(tree, bdir, jobs or os.cpu_count() or 2, progress)

        staging = llama_root / f".{key}.tmp{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        _install(bdir, staging)
        info = {"key": key, "backend": backend, "targets": list(build_targets()),
                "llama_cpp_commit": LLAMA_CPP_COMMIT,
                "llama_cpp_python": LLAMA_CPP_PYTHON, "sdist_sha256": SDIST_SHA256,
                "patches": [p.name for p in patch_files(root)],
                "native": [rel for _, rel in native_files(root)],
                "cmake_flags": list(backend_flags(backend)),
                "seconds": round(time.monotonic() - t0, 1)}
        (staging / INFO).write_text(json.dumps(info, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
        marker_tmp = dest / (MARKER + ".tmp")
        marker_tmp.write_text(f"{key}\n")
        os.replace(marker_tmp, dest / MARKER)  # last: a present marker means a whole build
        _say(progress, f"done in {info['seconds']:.0f} s: {dest}")
        return dest
