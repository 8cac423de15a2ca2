"""The patched llama.cpp, loaded lazily: bindings of the llama_orthrus_* C API and a small
owner of one model + context (NativeModel) for the decoding loop.

Importing this module loads nothing; `load()` (called by NativeModel) finds the build of
`orthrus-gguf build`, points llama-cpp-python at it through LLAMA_CPP_LIB_PATH and binds
the patched symbols. Every non-zero status of the C API raises OrthrusError.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .errors import OrthrusError, utf8

# status codes of include/llama.h (LLAMA_ORTHRUS_*)
OK = 0
ERR_NOT_ORTHRUS = -1
ERR_ARG = -2
ERR_SEQ = -3
ERR_UBATCH = -4
ERR_BATCH = -5
ERR_POS = -6
ERR_CTX = -7
ERR_MEMORY = -8
ERR_KV_FULL = -9
ERR_ABORTED = -10
ERR_DECODE = -11
ERR_ROWS = -12
ERR_SEQ_RM = -13
ERR_SPLIT = -14
ERR_NOT_SAMPLED = -15

# statuses returned before anything was decoded: the cache is as it was
_UNCHANGED = (ERR_ARG, ERR_SEQ, ERR_BATCH, ERR_MEMORY, ERR_POS, ERR_CTX, ERR_UBATCH, ERR_NOT_ORTHRUS, ERR_SPLIT)

VIEW_AR = 0
VIEW_DIFFUSION = 1

# enum ggml_type of the KV cache types llama.cpp's -ctk/-ctv accept
KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "iq4_nl": 20,
             "q5_0": 6, "q5_1": 7}
# Backend sampling by default from this vocabulary size on (where layers are offloaded). What
# it saves grows with the vocabulary: each row's n_vocab floats not copied to the host (~0.16
# ns each over PCIe) and not scanned there (~0.2-0.5 ns each); what it adds does not:
# llama.cpp's sampling graph has an argmax node and a separate device-to-host copy per row
# (a few us each). They break even near 10k tokens (an estimate, not measured on a GPU):
# Qwen3's 151,936 gains, orthrus-tiny's 4,096 would lose.
BACKEND_SAMPLING_MIN_VOCAB = 16384


def default_backend_sampling(offloaded: bool, n_vocab: int) -> bool:
    """Whether NativeModel(backend_sampling=None) turns backend sampling on."""
    return offloaded and n_vocab >= BACKEND_SAMPLING_MIN_VOCAB


# LLAMA_ORTHRUS_EXACT_* of include/llama.h: which forwards run on the batch-invariant kernels
EXACT_MODES = {"off": 0, "verify": 1, "all": 2}

_i32, _p = ctypes.c_int32, ctypes.c_void_p
# name -> (argtypes, restype); the C prototypes are in include/llama.h of the patched tree
_SIGNATURES = {
    "llama_orthrus_strerror": ([_i32], ctypes.c_char_p),
    "llama_orthrus_set_view": ([_p, _i32], _i32),
    "llama_orthrus_get_view": ([_p], _i32),
    "llama_model_orthrus_block_size": ([_p], _i32),
    "llama_model_orthrus_mask_token": ([_p], _i32),
    # ctx, seq, t, p, n_block
    "llama_orthrus_draft": ([_p, _i32, _i32, _i32, _i32], _i32),
    # ctx, n_seqs, seqs, ts, ps, n_blocks
    "llama_orthrus_draft_seqs": ([_p, _i32] + [ctypes.POINTER(_i32)] * 4, _i32),
    # ctx, seq, tokens, n, p (arrays of the hot path as void *: numpy's .ctypes.data, an int,
    # costs far less than .ctypes.data_as)
    "llama_orthrus_verify": ([_p, _i32, _p, _i32, _i32], _i32),
    "llama_orthrus_n_outputs": ([_p], _i32),
    # ctx, n_rows, out
    "llama_orthrus_argmax": ([_p, _i32, _p], _i32),
    # logits, n_rows, n_vocab, out
    "llama_orthrus_argmax_rows": ([ctypes.POINTER(ctypes.c_float), _i32, ctypes.c_int64, ctypes.POINTER(_i32)], _i32),
    # ctx, n_rows, out: the backend sampler's tokens
    "llama_orthrus_sampled": ([_p, _i32, _p], _i32),
    "llama_orthrus_log_set_min_level": ([_i32], None),
    # ctx, max_slots / ctx, size_t* compute bytes
    "llama_orthrus_set_graph_slots": ([_p, _i32], _i32),
    "llama_orthrus_graph_slots": ([_p, ctypes.POINTER(ctypes.c_size_t)], _i32),
    "llama_orthrus_set_exact": ([_p, _i32], _i32),
    # the C++ auto policy (native/src/llama-orthrus-policy.cpp), bound for its tests
    "llama_orthrus_warm_widths": ([_i32, ctypes.POINTER(_i32), _i32], _i32),
    "llama_orthrus_calibration_passes": ([], _i32),
    "llama_orthrus_calibration_cost": ([ctypes.POINTER(ctypes.c_double), _i32], ctypes.c_double),
    "llama_orthrus_policy_init": ([_i32, ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_double)], _p),
    "llama_orthrus_policy_free": ([_p], None),
    "llama_orthrus_policy_choose": ([_p, _i32], _i32),
    "llama_orthrus_policy_update": ([_p, _i32, _i32], None),
}

_LOG_DEBUG, _LOG_ERROR = 1, 4  # enum ggml_log_level

_state: SimpleNamespace | None = None
_global_handle = None


def with_cpu_defaults(env):
    """env (a dict or os.environ) with this project's CPU backend defaults where unset: no AMX
    weight buffers unless asked for (GGML_CPU_AMX=1), since on some virtual machines the AMX
    kernels fault with SIGILL on the first batched q8_0 product (patch 0009). For this process
    and for every llama.cpp process it starts."""
    env.setdefault("GGML_CPU_AMX", "0")
    return env


def load(lib_dir: str | Path | None = None) -> SimpleNamespace:
    """Load the patched libllama once; returns a namespace with `llama_cpp` (the low-level
    module of llama-cpp-python), `lib` (the CDLL) and the bound llama_orthrus_* functions."""
    global _state, _global_handle
    if _state is not None:
        return _state
    from . import build

    if lib_dir is None:
        lib_dir = build.library_dir()
        if lib_dir is None:
            raise OrthrusError(
                "the patched llama.cpp is not built for the current sources: run `orthrus-gguf build` "
                f"(builds land in {build.cache_root() / 'llama.cpp'}; ORTHRUS_GGUF_LIB_DIR overrides)")
    lib_dir = Path(lib_dir).resolve()
    if not any((lib_dir / n).exists() for n in ("libllama.so", "libllama.dylib", "llama.dll")):
        raise OrthrusError(f"no libllama in {lib_dir}: run `orthrus-gguf build --force`")

    if "llama_cpp.llama_cpp" in sys.modules:
        loaded = getattr(sys.modules["llama_cpp.llama_cpp"], "_base_path", None)
        if loaded is None or Path(loaded).resolve() != lib_dir:
            raise OrthrusError(
                f"llama_cpp was imported before orthrus_gguf.native.load() and loaded libllama from "
                f"{loaded}, not the patched build in {lib_dir}: load orthrus_gguf.native first, "
                f"or set LLAMA_CPP_LIB_PATH={lib_dir} before starting Python")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    link_llama_cpp_lib(lib_dir)
    with_cpu_defaults(os.environ)
    if sys.platform.startswith("linux"):
        # the C++ runtime into the global scope before llama_cpp dlopens libllama with
        # RTLD_LOCAL: without it, model loading segfaulted inside libstdc++ stream code under
        # Ubuntu 24.04's Python 3.12 (plain qwen3 too; fine from C, with it preloaded, or here)
        try:
            _global_handle = ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass
    try:
        import llama_cpp.llama_cpp as llama_cpp
    except (OSError, RuntimeError) as e:
        raise OrthrusError(f"could not load libllama from {lib_dir}: {e}; "
                           "run `orthrus-gguf build --force`") from e
    lib = llama_cpp._lib
    missing = [name for name in _SIGNATURES if not hasattr(lib, name)]
    if missing:
        raise OrthrusError(
            f"{lib_dir} lacks {', '.join(missing)}: it is not the orthrus-patched llama.cpp; "
            "run `orthrus-gguf build --force`")
    fns = {}
    for name, (argtypes, restype) in _SIGNATURES.items():
        f = getattr(lib, name)
        f.argtypes, f.restype = argtypes, restype
        fns[name.replace("llama_", "", 1)] = f
    # log from C (errors only unless ORTHRUS_GGUF_VERBOSE): no Python callback per log line
    fns["orthrus_log_set_min_level"](_LOG_DEBUG if os.environ.get("ORTHRUS_GGUF_VERBOSE") else _LOG_ERROR)
    llama_cpp.llama_backend_init()
    _state = SimpleNamespace(llama_cpp=llama_cpp, lib=lib, lib_dir=lib_dir, **fns)
    return _state


def kv_type_id(t: str | int) -> int:
    """enum ggml_type of a KV cache type given by name (llama.cpp's -ctk/-ctv) or number."""
    if isinstance(t, int) and not isinstance(t, bool) and t in KV_TYPES.values():
        return t
    if isinstance(t, str) and t.lower() in KV_TYPES:
        return KV_TYPES[t.lower()]
    raise OrthrusError(f"KV cache type must be one of {', '.join(KV_TYPES)}, not {t!r}")


def gpu_layers_spec(value) -> int | str:
    """n_gpu_layers as llama.cpp's -ngl takes it, checked, not resolved: an integer >= -1
    (-1: all; a string of one too), "all" or "auto"."""
    if isinstance(value, str) and value in ("all", "auto"):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise OrthrusError(f"n_gpu_layers must be an integer >= -1, 'all' or 'auto', got {value!r}")
    return value


def _ggml_base():
    """ggml's device functions of the loaded build (the registry is in libggml, the device
    interface in libggml-base), bound."""
    st = load()
    if getattr(st, "ggml", None) is None:
        libs = [ctypes.CDLL(str(next(st.lib_dir.glob(f"{n}.*")))) for n in ("libggml", "libggml-base")]
        ggml = SimpleNamespace()
        for name, args, res in (("ggml_backend_reg_dev_count", [_p], ctypes.c_size_t),
                                ("ggml_backend_reg_dev_get", [_p, ctypes.c_size_t], _p),
                                ("ggml_backend_dev_count", [], ctypes.c_size_t),
                                ("ggml_backend_dev_get", [ctypes.c_size_t], _p),
                                ("ggml_backend_dev_type", [_p], ctypes.c_int)):
            f = next(getattr(lib, name) for lib in libs if hasattr(lib, name))
            f.argtypes, f.restype = args, res
            setattr(ggml, name, f)
        st.ggml = ggml
    return st.ggml


_DEV_GPU, _DEV_IGPU = 1, 2  # enum ggml_backend_dev_type


def _local_gpus() -> list[int]:
    """This machine's GPU devices (ggml_backend_dev_t). llama_supports_gpu_offload is no
    answer: it is true on any build with the RPC backend, GPU or not."""
    st = load()
    st.llama_cpp.llama_supports_gpu_offload()  # loads the backends if none is registered yet
    g = _ggml_base()
    devs = [g.ggml_backend_dev_get(i) for i in range(g.ggml_backend_dev_count())]
    return [d for d in devs if g.ggml_backend_dev_type(d) in (_DEV_GPU, _DEV_IGPU)]


def gpu_layers(value) -> int:
    """The layer count llama.cpp gets for n_gpu_layers: "all" is -1, "auto" all where this
    machine has a GPU the build can use and none otherwise."""
    value = gpu_layers_spec(value)
    if value == "all":
        return -1
    if value == "auto":
        return -1 if _local_gpus() else 0
    return value


def offloads(n_gpu_layers) -> bool:
    """Whether a model loaded with n_gpu_layers puts layers on a GPU of this machine."""
    return gpu_layers(n_gpu_layers) != 0 and bool(_local_gpus())


def rpc_endpoints(servers) -> list[str]:
    """RPC servers as llama.cpp's --rpc takes them ("host:port,host:port" or a list), checked:
    each is host:port with a port in [1, 65535] and answers a TCP connection now (llama.cpp
    aborts the process on an endpoint it cannot reach or parse)."""
    import socket
    if servers is None:
        return []
    if not isinstance(servers, (str, list, tuple)):
        raise OrthrusError(f"rpc_servers must be \"host:port,…\" or a list of host:port strings, "
                           f"got {type(servers).__name__}")
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    out = []
    for ep in items:
        host, sep, port = str(ep).strip().rpartition(":")
        if not isinstance(ep, str) or not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise OrthrusError(f"RPC server {ep!r} is not host:port (e.g. 192.168.1.7:50052)")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as e:
            raise OrthrusError(f"RPC server {ep} does not answer ({e.strerror or e}): start "
                               f"`ggml-rpc-server -H 0.0.0.0 -p {port}` on that machine (it is in "
                               "`orthrus-gguf build`'s output) and check the network") from None
        out.append(f"{host}:{port}")
    if not out:
        raise OrthrusError("rpc_servers is empty: give host:port of at least one ggml-rpc-server")
    return out


def offload_devices(servers) -> ctypes.Array | None:
    """The NULL-terminated ggml_backend_dev_t list for llama_model_params.devices: the devices
    of these RPC servers, then this machine's GPUs (llama.cpp's own order for --rpc), or None
    (no servers: llama.cpp picks the devices itself). The servers are not registered with
    ggml globally, so other models in this process never see them."""
    endpoints = rpc_endpoints(servers)
    if not endpoints:
        return None
    lib_dir = load().lib_dir
    try:
        rpc = ctypes.CDLL(str(next(lib_dir.glob("libggml-rpc.*"))))
    except StopIteration:
        raise OrthrusError(f"this build ({lib_dir}) has no RPC backend: rebuild with `orthrus-gguf build`") from None
    rpc.ggml_backend_rpc_add_server.argtypes, rpc.ggml_backend_rpc_add_server.restype = [ctypes.c_char_p], _p
    ggml = _ggml_base()
    devs = []
    for ep in endpoints:
        reg = rpc.ggml_backend_rpc_add_server(ep.encode())
        if not reg:
            raise OrthrusError(f"RPC server {ep} reports no devices")
        devs += [ggml.ggml_backend_reg_dev_get(reg, i) for i in range(ggml.ggml_backend_reg_dev_count(reg))]
    devs += _local_gpus()
    return (_p * (len(devs) + 1))(*devs, None)


def exact_mode(value) -> str:
    """The name of an exact mode: "off", "verify", "all"; False means "off", True "verify"."""
    if value is True or value is False:
        return "verify" if value else "off"
    if isinstance(value, str) and value in EXACT_MODES:
        return value
    raise OrthrusError(f"exact must be one of {', '.join(EXACT_MODES)} (or True/False), got {value!r}")


def set_verbose(on: bool) -> None:
    """llama.cpp's log on stderr: everything (on) or errors only (off, the default;
    ORTHRUS_GGUF_VERBOSE=1 turns it on at load)."""
    load().orthrus_log_set_min_level(_LOG_DEBUG if on else _LOG_ERROR)


def link_llama_cpp_lib(lib_dir: Path) -> Path | None:
    """Point llama-cpp-python's own library folder (llama_cpp/lib, where it looks when
    LLAMA_CPP_LIB_PATH is unset) at the patched build, so that `import llama_cpp` before
    orthrus_gguf loads it too. Only where that folder is ours to set: absent (the install
    built no llama.cpp) or a link made here. Returns the link, or None."""
    import importlib.util
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    link = Path(list(spec.submodule_search_locations)[0]) / "lib"
    try:
        if link.is_symlink():
            if link.resolve() == Path(lib_dir).resolve():
                return link
            tmp = link.with_name(f".lib-orthrus-{os.getpid()}")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(lib_dir, target_is_directory=True)
            os.replace(tmp, link)  # atomic: another process never sees no link
        elif not link.exists():
            link.symlink_to(lib_dir, target_is_directory=True)
        else:
            return None
    except OSError:
        return None
    return link


def strerror(status: int) -> str:
    return load().orthrus_strerror(status).decode()


def check(status: int, what: str) -> None:
    """Raise OrthrusError for a non-zero status of the C API."""
    if status != OK:
        raise OrthrusError(f"{what}: {strerror(status)} (status {status})")


def _guarded(fn):
    """A method that reaches into the C state: refused once closed, or while another thread
    is inside the same model (llama.cpp contexts are not thread-safe)."""
    @functools.wraps(fn)
    def run(self, *args, **kw):
        self._acquire()
        try:
            return fn(self, *args, **kw)
        finally:
            self._lock.release()
    return run


class NativeModel:
    """One GGUF model and one context (sequence 0) of the patched llama.cpp.

    Positions are explicit everywhere: a decode at p requires the cache to hold exactly the
    positions < p (else OrthrusError, nothing changed). Logits rows refer to the last decode.
    """

    def __init__(self, path: str | Path, *, n_ctx: int = 4096, n_batch: int = 512,
                 n_ubatch: int | None = None, n_threads: int | None = None,
                 n_gpu_layers: int | str = 0, kv_type: str | int = "f16", type_v: str | int | None = None,
                 flash_attn: bool | None = None, seq: int = 0, repack: bool = True,
                 exact: bool | str = False, rpc_servers: str | list[str] | None = None,
                 n_seq_max: int = 1, kv_unified: bool = False, backend_sampling: bool | None = None,
                 n_outputs_max: int | str | None = None, op_offload: bool | None = None):
        self._ctx = self._model = None
        self._batch = None
        self._chain = None  # the greedy sampler chain attached for backend sampling, if any
        self._can_sample = self._ids_only = False
        self._lock = threading.RLock()
        self.n = load()
        lc = self.n.llama_cpp
        from .convert.info import preflight
        path = preflight(path)  # the file checks (check_gguf_file), then what llama.cpp would abort on
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = gpu_layers(n_gpu_layers)
        # RPC servers: llama.cpp's way to put layers on other machines (they count as GPUs)
        self._devices = offload_devices(rpc_servers)
        if self._devices is not None:
            mp.devices = ctypes.cast(self._devices, ctypes.c_void_p).value
            if n_gpu_layers == "auto":
                mp.n_gpu_layers = -1
        mp.use_extra_bufts = repack  # CPU weight repacking (faster gemm kernels)
        # backend sampling (llama.cpp's, with a greedy chain): greedy picks are argmaxes on the
        # device of the output layer, and a forward sends back w token ids, not w x n_vocab
        # floats (19 MB for 32 rows of a 152k vocabulary) to be argmaxed by the host. Worth it
        # where the output layer is not on this CPU (llama.cpp puts it on the GPU from
        # n_gpu_layers >= 1, locally or by RPC) and the vocabulary is large
        # (default_backend_sampling).
        if not (backend_sampling is None or isinstance(backend_sampling, (bool, np.bool_))):
            raise OrthrusError(f"backend_sampling must be True, False or None (where layers are offloaded "
                               f"and the vocabulary is large), got {backend_sampling!r}")
        offloaded = mp.n_gpu_layers != 0 and (self._devices is not None or bool(_local_gpus()))
        self._model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not self._model:
            raise OrthrusError(f"llama.cpp could not load {path} (set ORTHRUS_GGUF_VERBOSE=1 for its log)")
        if backend_sampling is None:
            backend_sampling = default_backend_sampling(
                offloaded, lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model)))
        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_ubatch if n_ubatch is not None else n_batch
        cp.n_seq_max = n_seq_max  # sequences of the cache (this object decodes `seq`)
        cp.kv_unified = kv_unified
        threads = n_threads or max(1, min(os.cpu_count() or 1, 8))
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        try:
            cp.type_k, cp.type_v = kv_type_id(kv_type), kv_type_id(kv_type if type_v is None else type_v)
        except OrthrusError:
            self.close()
            raise
        # None: llama.cpp decides (enabled where the backend supports it)
        if not (flash_attn is None or isinstance(flash_attn, (bool, np.bool_))):
            self.close()
            raise OrthrusError(f"flash_attn must be True, False or None (llama.cpp decides), got {flash_attn!r}")
        if flash_attn is not None and not flash_attn and cp.type_v not in (kv_type_id("f32"), kv_type_id("f16"), kv_type_id("bf16")):
            self.close()
            raise OrthrusError(f"a quantized V cache (type_v={type_v or kv_type!r}) needs flash attention in "
                               "llama.cpp: set flash_attn to True or None (-fa on|auto), or use an f16 V cache")
        cp.flash_attn_type = {None: -1, False: 0, True: 1}[flash_attn]
        # op_offload: llama.cpp's (None: its default, on), which computes the products of
        # CPU-resident layers on a GPU for batches of >= 32 rows. Exact forwards run without it
        # (the GPU's kernels are not batch-invariant; patch 0008): "verify" runs its verifies on
        # schedulers of their own, "all" turns it off for the context while it is on
        if not (op_offload is None or isinstance(op_offload, (bool, np.bool_))):
            self.close()
            raise OrthrusError(f"op_offload must be True, False or None (llama.cpp's default), got {op_offload!r}")
        if op_offload is not None:
            cp.op_offload = bool(op_offload)
        # n_outputs_max: the most rows of logits one decode may have (None: n_batch, llama.cpp's
        # default; "block": the GGUF's block, all an Orthrus loop needs). llama.cpp reserves its
        # compute buffers for a batch whose every row has logits: n_ubatch x n_vocab floats,
        # 300 MiB at 512 x 151,936 (twice that with backend sampling), against 19 MiB at 32.
        if n_outputs_max == "block":
            n_outputs_max = max(1, self.n.model_orthrus_block_size(self._model))
        if n_outputs_max is not None:
            if isinstance(n_outputs_max, bool) or not isinstance(n_outputs_max, int) or n_outputs_max < 1:
                self.close()
                raise OrthrusError(f"n_outputs_max must be an integer >= 1, 'block' or None, got {n_outputs_max!r}")
            cp.n_outputs_max = n_outputs_max
        if backend_sampling:
            cp.n_outputs_max_per_seq = 0  # a verify samples every row of one sequence (default 1)
        self._ctx = lc.llama_init_from_model(self._model, cp)
        if not self._ctx:
            self.close()
            raise OrthrusError(f"llama.cpp could not create a context for {path} "
                               f"(n_ctx={n_ctx}, n_batch={n_batch})")
        self.path, self.seq, self.n_threads = path, seq, threads
        self.n_ctx = lc.llama_n_ctx(self._ctx)
        self.n_batch = lc.llama_n_batch(self._ctx)
        self.n_ubatch = lc.llama_n_ubatch(self._ctx)
        self.n_outputs_max = n_outputs_max or self.n_batch
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model))
        self.block_size = self.n.model_orthrus_block_size(self._model)
        self.mask_token = self.n.model_orthrus_mask_token(self._model)
        self.arch = self._meta("general.architecture")
        self._batch = lc.llama_batch_init(self.n_batch, 0, 1)
        self._mem = lc.llama_get_memory(self._ctx)
        self._vocab = lc.llama_model_get_vocab(self._model)
        self._eog: dict[int, bool] = {}
        self.tokens: list[int] = []  # the cache's contents, position by position
        self._lease: object | None = None  # the generation that owns the cache (lease())
        # exact: forwards on the CPU kernels with which a forward of B tokens gives bit for bit
        # the logits of B one-token forwards (ggml's reference mode, patch 0005;
        # docs/NUMERICS.md): "verify" for verify forwards only (prompts and drafts keep the fast
        # kernels), "all" for every forward, "off" (False) for none; True means "verify".
        self.exact = exact
        self._can_sample = bool(backend_sampling)

    # -------------------------------------------------------------- lifetime

    def _acquire(self) -> None:
        if not self._model:
            raise OrthrusError("the model is closed: create a new Orthrus (or NativeModel) to use it again")
        if not self._lock.acquire(blocking=False):
            raise OrthrusError("this model is in use by another thread: use one Orthrus object per "
                               "thread, or put a lock around its calls")

    @contextmanager
    def exclusive(self, lease: object | None = None):
        """Hold the model for a block of calls (a decoding step), checking the lease first."""
        self._acquire()
        try:
            if lease is not None:
                self.check_lease(lease)
            yield self
        finally:
            self._lock.release()

    def close(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None and not lock.acquire(blocking=False):
            raise OrthrusError("close() while another thread is using the model: let it finish first")
        try:
            self._close()
        finally:
            if lock is not None:
                lock.release()

    def _close(self) -> None:
        lc = self.n.llama_cpp
        if self._batch is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            lc.llama_free(self._ctx)
            self._ctx = None
        if self._chain:  # after the context that refers to it
            lc.llama_sampler_free(self._chain)
            self._chain = None
        if self._model:
            lc.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "NativeModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def ctx(self):
        if not self._ctx:
            raise OrthrusError("the model is closed")
        return self._ctx

    @_guarded
    def _meta(self, key: str) -> str:
        buf = ctypes.create_string_buffer(256)
        n = self.n.llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else ""

    @property
    def is_orthrus(self) -> bool:
        return self.block_size > 0

    # -------------------------------------------------------------- cache

    @property
    @_guarded
    def n_past(self) -> int:
        """Number of positions in the cache (max position + 1)."""
        return self.n.llama_cpp.llama_memory_seq_pos_max(self._mem, self.seq) + 1

    @_guarded
    def seq_rm(self, p: int) -> None:
        """Drop every cached position >= p."""
        if not self.n.llama_cpp.llama_memory_seq_rm(self._mem, self.seq, p, -1):
            raise OrthrusError(f"could not remove positions >= {p} from the KV cache")
        del self.tokens[p:]

    @_guarded
    def clear(self) -> None:
        self.seq_rm(0)

    @_guarded
    def lease(self) -> object:
        """Claim the cache for one generation; check_lease(lease) raises once another has
        claimed it since (two generations cannot interleave on one context)."""
        self._lease = object()
        return self._lease

    def check_lease(self, lease: object) -> None:
        if self._lease is not lease:
            raise OrthrusError("another generation ran on this model while this one was paused: "
                               "finish (or close) one stream before starting the next, or use one "
                               "Orthrus object per stream")

    @_guarded
    def reuse_prefix(self, tokens) -> int:
        """Keep the longest cached prefix of `tokens` but at least their last token (whose
        logits a caller needs), drop the rest of the cache; returns the positions kept."""
        n = 0
        for a, b in zip(self.tokens, tokens[: len(tokens) - 1]):
            if a != b:
                break
            n += 1
        if n < len(self.tokens):
            self.seq_rm(n)
        return n

    # -------------------------------------------------------------- forwards

    @_guarded
    def prefill(self, tokens, p: int | None = None) -> None:
        """AR decode of tokens at p.. (default: after the cache), in n_batch chunks; only the
        last row's logits are kept (logits(1) / argmax(1))."""
        toks = np.ascontiguousarray(tokens, dtype=np.int32).ravel()
        p = self.n_past if p is None else p
        if toks.size == 0:
            raise OrthrusError("prefill of no tokens")
        self._check_tokens(toks)
        if p != self.n_past:
            raise OrthrusError(f"prefill at position {p}, but the cache holds positions < {self.n_past}")
        if p + toks.size > self.n_ctx:
            raise OrthrusError(f"prefill of {toks.size} tokens at {p} exceeds n_ctx={self.n_ctx}")
        lc, b = self.n.llama_cpp, self._batch
        self.n.orthrus_set_view(self.ctx, VIEW_AR)
        for start in range(0, toks.size, self.n_batch):
            chunk = toks[start:start + self.n_batch]
            n = chunk.size
            np.ctypeslib.as_array(b.token, (n,))[:] = chunk
            np.ctypeslib.as_array(b.pos, (n,))[:] = np.arange(p + start, p + start + n, dtype=np.int32)
            np.ctypeslib.as_array(b.n_seq_id, (n,))[:] = 1
            np.ctypeslib.as_array(b.logits, (n,))[:] = 0
            for i in range(n):
                b.seq_id[i][0] = self.seq
            if start + n == toks.size:
                b.logits[n - 1] = 1
            b.n_tokens = n
            rc = lc.llama_decode(self.ctx, b)
            if rc != 0:
                self.seq_rm(p)
                raise OrthrusError(f"llama_decode failed (returned {rc}) in a prefill at {p + start}")
            self.tokens.extend(int(x) for x in chunk)
        # llama_decode returns while a GPU still computes: wait here, as the C API's draft and
        # verify do, so that a forward's time is the forward's, not its launch's (the caller
        # reads the logits next, which would wait anyway)
        lc.llama_synchronize(self.ctx)
        self._ids_only = self._chain is not None

    @_guarded
    def decode_ar(self, tokens, p: int) -> None:
        """AR decode of tokens at p.. with logits for every row; the tokens stay cached."""
        toks = np.ascontiguousarray(tokens, dtype=np.int32).ravel()
        status = self.n.orthrus_verify(self.ctx, self.seq, toks.ctypes.data, toks.size, p)
        if status == OK:
            self.tokens[p:] = toks.tolist()
            self._ids_only = self._chain is not None
        elif status not in _UNCHANGED:  # a failed decode: the C API left the positions < p
            del self.tokens[p:]
        check(status, f"AR decode of {toks.size} tokens at {p}")

    verify = decode_ar

    @_guarded
    def draft(self, t: int, p: int, n: int) -> None:
        """Diffusion pass over [t, M, …, M] (n tokens) at p..p+n-1; logits for every row,
        the cache unchanged."""
        check(self.n.orthrus_draft(self.ctx, self.seq, int(t), p, n),
              f"diffusion pass of {n} tokens at {p}")
        self._ids_only = self._chain is not None

    def _check_tokens(self, toks: np.ndarray) -> None:
        if toks.size and (toks.min() < 0 or toks.max() >= self.n_vocab):
            raise OrthrusError(f"token ids must lie in [0, {self.n_vocab}); got {toks.min()}..{toks.max()}")

    # -------------------------------------------------------------- outputs

    @property
    @_guarded
    def n_outputs(self) -> int:
        """Rows of logits of the last decode."""
        return self.n.orthrus_n_outputs(self.ctx)

    @_guarded
    def logits(self, n_rows: int | None = None) -> np.ndarray:
        """The first n_rows (default all) rows of logits of the last decode, [n_rows, n_vocab]
        float32: a view into llama.cpp's buffer, valid until the next decode (copy to keep)."""
        if self._ids_only:
            raise OrthrusError("the last decode sent back token ids only (backend sampling is on): "
                               "call set_backend_sampling(False) before a decode whose logits you need")
        n_out = self.n_outputs
        n_rows = n_out if n_rows is None else n_rows
        if not 0 < n_rows <= n_out:
            raise OrthrusError(f"asked for {n_rows} rows of logits, the last decode has {n_out}")
        ptr = self.n.llama_cpp.llama_get_logits(self.ctx)
        if not ptr:
            raise OrthrusError("the last decode produced no logits")
        return np.ctypeslib.as_array(ptr, shape=(n_rows, self.n_vocab))

    @_guarded
    def argmax(self, n_rows: int | None = None) -> np.ndarray:
        """Argmax of each of the first n_rows rows of logits, int32 [n_rows]: on the host
        (ties: lowest id), or, if the last decode ran with backend sampling, as the output
        layer's device computed it (ggml_argmax: its own ties rule, the same for every forward)."""
        n_rows = self.n_outputs if n_rows is None else n_rows
        out = np.empty(n_rows, dtype=np.int32)
        fn = self.n.orthrus_sampled if self._ids_only else self.n.orthrus_argmax
        status = fn(self.ctx, n_rows, out.ctypes.data)
        if status != OK:
            check(status, f"argmax of {n_rows} rows")
        return out

    @property
    def backend_sampling(self) -> bool:
        """Whether decodes now pick greedy tokens on the backend (set_backend_sampling)."""
        return self._chain is not None

    @_guarded
    def set_backend_sampling(self, on: bool) -> bool:
        """Greedy picks on the device of the output layer from the next decode on (on), or
        logits for the host (off); returns whether backend sampling is now on. Only a model
        opened with backend_sampling (by default: offloaded, with a large vocabulary) can turn it on.
        A change re-reserves llama.cpp's scheduler and so drops the kept graphs: switch per
        generation, not per step."""
        on = bool(on) and self._can_sample
        if on == (self._chain is not None):
            return on
        lc = self.n.llama_cpp
        if not on:
            lc.llama_set_sampler(self.ctx, self.seq, None)
            lc.llama_sampler_free(self._chain)
            self._chain = None
            return False
        # a chain initialises for one context once: a new one each time it is attached
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        if not lc.llama_set_sampler(self.ctx, self.seq, chain):
            # llama.cpp could not offload it (it logged why): the host's argmax, from now on
            lc.llama_sampler_free(chain)
            self._can_sample = False
            return False
        self._chain = chain
        return True

    # -------------------------------------------------------------- graphs

    @property
    @_guarded
    def n_reused(self) -> int:
        """Forwards so far that reused a kept graph (llama.cpp's own counter)."""
        return int(self.n.llama_cpp.llama_perf_context(self.ctx).n_reused)

    @_guarded
    def graph_slots(self) -> tuple[int, int]:
        """(kinds of batch with a kept graph, bytes of their compute buffers)."""
        nbytes = ctypes.c_size_t(0)
        n = self.n.orthrus_graph_slots(self.ctx, ctypes.byref(nbytes))
        return int(n), int(nbytes.value)

    @property
    def exact(self) -> str:
        """Which forwards run on the batch-invariant CPU kernels: "off", "verify" or "all"."""
        return self._exact

    @exact.setter
    @_guarded
    def exact(self, value: bool | str) -> None:
        mode = exact_mode(value)
        check(self.n.orthrus_set_exact(self.ctx, EXACT_MODES[mode]), f"set exact {mode}")
        self._exact = mode

    @_guarded
    def set_graph_slots(self, max_slots: int) -> None:
        """Keep graphs for at most max_slots kinds of batch (0: upstream's single graph)."""
        check(self.n.orthrus_set_graph_slots(self.ctx, int(max_slots)), f"set graph slots {max_slots}")

    @_guarded
    def margin(self) -> float:
        """The gap between the two largest logits of the last row of the last decode."""
        row = np.partition(self.logits()[-1], self.n_vocab - 2)
        return float(row[-1] - row[-2])

    # -------------------------------------------------------------- vocabulary

    def token_id(self, token) -> int:
        """A token id as an int, refused (not wrapped, not a crash in C++) outside the vocabulary."""
        if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
            raise OrthrusError(f"a token id must be an int, got {type(token).__name__} {token!r:.40}")
        if not 0 <= token < self.n_vocab:
            raise OrthrusError(f"token id {token} is outside the vocabulary [0, {self.n_vocab})")
        return int(token)

    @_guarded
    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        """llama_tokenize, as llama_cpp.Llama.tokenize (add_bos: the BOS the GGUF asks for)."""
        raw = utf8(text, "the text to tokenize")
        n_max = len(raw) + 8
        buf = (ctypes.c_int32 * n_max)()
        n = self.n.llama_cpp.llama_tokenize(self._vocab, raw, len(raw), buf, n_max, add_bos, special)
        if n < 0:
            raise OrthrusError(f"tokenize failed for a text of {len(raw)} bytes")
        return list(buf[:n])

    @_guarded
    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (special tokens render as text only with special=True)."""
        lc = self.n.llama_cpp
        token = self.token_id(token)
        buf = ctypes.create_string_buffer(64)
        n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    @_guarded
    def detokenize(self, tokens, special: bool = False) -> bytes:
        if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
            raise OrthrusError(f"detokenize takes a sequence of token ids, got {type(tokens).__name__}")
        return b"".join(self.token_bytes(t, special) for t in tokens)

    @_guarded
    def is_eog(self, token: int) -> bool:
        """Whether a token ends generation (EOS, EOT, ...: the GGUF's end-of-generation set)."""
        hit = self._eog.get(token) if isinstance(token, (int, np.integer)) else None
        if hit is None:
            token = self.token_id(token)
            hit = self._eog[token] = bool(self.n.llama_cpp.llama_vocab_is_eog(self._vocab, token))
        return hit

    @_guarded
    def chat_template(self) -> str | None:
        """The GGUF's default chat template (tokenizer.chat_template), or None."""
        tmpl = self.n.llama_cpp.llama_model_chat_template(self._model, None)
        return tmpl.decode() if tmpl else None

    # -------------------------------------------------------------- view

    @property
    @_guarded
    def view(self) -> int:
        return self.n.orthrus_get_view(self.ctx)

    @view.setter
    @_guarded
    def view(self, v: int) -> None:
        check(self.n.orthrus_set_view(self.ctx, v), f"set view {v}")


class Grammar:
    """llama.cpp's GBNF grammar sampler over a model's vocabulary: allowed() is the set of
    tokens that may come next, accept(token) advances it. One per generation."""

    # struct llama_token_data {llama_token id; float logit; float p;}
    _DTYPE = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])

    def __init__(self, nm: NativeModel, gbnf: str, root: str = "root"):
        self._lc = lc = nm.n.llama_cpp
        self._smpl = None
        nm._acquire()  # open, and this thread's
        nm._lock.release()
        if not isinstance(gbnf, str):
            raise OrthrusError("grammar must be a GBNF string (or a llama_cpp.LlamaGrammar), "
                               f"got {type(gbnf).__name__}")
        if not gbnf.strip():
            raise OrthrusError("the grammar is empty: give GBNF rules, at least `root ::= ...`")
        self._smpl = lc.llama_sampler_init_grammar(nm._vocab, utf8(gbnf, "the grammar"), root.encode())
        if not self._smpl:
            raise OrthrusError("the grammar does not parse as llama.cpp GBNF "
                               "(ORTHRUS_GGUF_VERBOSE=1 shows llama.cpp's message)")
        self._data = np.zeros(nm.n_vocab, dtype=self._DTYPE)
        self._ids = np.arange(nm.n_vocab, dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """Boolean [n_vocab]: the tokens the grammar accepts next."""
        lc, d = self._lc, self._data
        d["id"], d["logit"], d["p"] = self._ids, 0.0, 0.0
        arr = lc.llama_token_data_array(data=d.ctypes.data_as(lc.llama_token_data_p), size=d.size,
                                        selected=-1, sorted=False)
        lc.llama_sampler_apply(self._smpl, ctypes.byref(arr))
        ok = np.zeros(d.size, dtype=bool)
        ok[d["id"][:arr.size]] = np.isfinite(d["logit"][:arr.size])
        return ok

    def accept(self, token: int) -> None:
        self._lc.llama_sampler_accept(self._smpl, int(token))

    def close(self) -> None:
        if self._smpl:
            self._lc.llama_sampler_free(self._smpl)
            self._smpl = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
