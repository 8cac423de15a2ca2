"""`orthrus-gguf serve`: the patched llama-server with Orthrus drafting on.

The server drafts with the diffusion view on its own context (`--spec-type orthrus`), so
there is no second model and no second KV cache; its existing verify path keeps greedy
requests lossless. `Server` starts it, waits for /health and always stops it (terminate,
wait, kill); `serve` runs one in the foreground until Ctrl-C.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .errors import OrthrusError, raise_signal
from .native import with_cpu_defaults

ORTHRUS_ARCH = "orthrus-qwen3"


def server_binary() -> Path:
    """llama-server of the finished build of the current inputs."""
    from .build import binary
    return binary("llama-server", "it serves Orthrus drafting")


def model_block_size(model: str | Path) -> int:
    """The GGUF's diffusion block size, or 0 for a model without the diffusion view."""
    from .convert.info import gguf_info, preflight
    info = gguf_info(preflight(model))  # damaged keys are named here, before llama-server starts
    if info.get("architecture") != ORTHRUS_ARCH:
        return 0
    return int(info.get("diffusion.block_size") or 0)


# llama-server flags that serve sets itself: given after --, they would fight serve's own
# (llama.cpp appends --spec-type values; a second --port leaves serve polling the first)
OWN_FLAGS = {
    "-m": "-m", "--model": "-m", "--host": "--host", "--port": "--port",
    "-np": "-np", "--parallel": "-np",
    "--spec-type": "--draft-max off|N|auto", "--spec-draft-n-max": "--draft-max", "--draft-max": "--draft-max",
    "--spec-orthrus-auto": "--draft-max auto", "--spec-orthrus-match": "--rule match",
}
NO_DRAFT_MODEL = ("Orthrus drafts with the model's own diffusion view: there is no draft model "
                  "(-md/--model-draft); serve the orthrus-qwen3 GGUF alone with -m")


def check_extra(extra) -> None:
    """Refuse llama-server flags after -- that serve owns, naming serve's option instead;
    check --rpc servers answer (llama-server aborts on one it cannot reach)."""
    from .native import rpc_endpoints
    extra = [str(a) for a in extra]
    for i, a in enumerate(extra):
        name, eq, value = a.partition("=")
        if name == "--rpc":
            rpc_endpoints(value if eq else (extra[i + 1] if i + 1 < len(extra) else ""))
        if name in ("-md", "--model-draft"):
            raise OrthrusError(NO_DRAFT_MODEL)
        if name in OWN_FLAGS:
            raise OrthrusError(f"{name} after -- would fight serve's own setting: use serve's "
                               f"{OWN_FLAGS[name]} instead (see orthrus-gguf serve --help)")


def server_command(model: str | Path, host: str = "127.0.0.1", port: int = 8080,
                   draft_max: int | str | None = None, n_parallel: int | None = None,
                   extra: tuple[str, ...] | list[str] = (), drafting: bool = True,
                   exe: Path | None = None, rule: str = "speculative",
                   per_slot: bool = False) -> tuple[list[str], str]:
    """The llama-server command line, and a one-line note on how it drafts.

    draft_max: None (block size - 1), an integer in [1, block size - 1], "auto" (the
    length is chosen per step from measured costs and acceptance, up to block size - 1),
    or "off" (no drafting: the GGUF served as plain llama-server serves it).
    n_parallel: server slots (None: llama-server's default, which picks the count itself).
    rule: how requests with temperature > 0 keep drafts: "speculative" (drafts sampled
    from the diffusion view, kept with probability min(1, p/q)) or "match" (greedy drafts,
    kept while the model's own sample equals them: llama.cpp's usual rule).
    per_slot: one diffusion forward per drafting slot (the path before batched drafting;
    only to measure against it)."""
    exe = exe or server_binary()
    if n_parallel is not None and (isinstance(n_parallel, bool) or not isinstance(n_parallel, int)
                                   or n_parallel < 1):
        raise OrthrusError(f"-np must be an integer >= 1, got {n_parallel!r}")
    if rule not in ("speculative", "match"):
        raise OrthrusError(f"rule must be 'speculative' or 'match', got {rule!r}")
    check_port(port, host=None)
    cmd = [str(exe), "-m", str(model), "--host", host, "--port", str(port)]
    if n_parallel is not None:
        cmd += ["-np", str(n_parallel)]
    block = model_block_size(model)
    if draft_max == "off":
        drafting, why = False, "--draft-max off"
    else:
        why = "asked for"
    if not drafting:
        note = f"drafting off ({why})"
    elif block < 2:
        note = f"drafting off: {model} is not an {ORTHRUS_ARCH} GGUF (no diffusion view)"
    else:
        cmd += ["--spec-type", "orthrus"]
        if draft_max == "auto":
            cmd += ["--spec-orthrus-auto"]
            note = f"Orthrus drafting on: auto length, up to {block - 1} drafts per step"
        else:
            n = block - 1 if draft_max is None else check_draft_max(draft_max, block)
            cmd += ["--spec-draft-n-max", str(n)]
            note = f"Orthrus drafting on: {n} drafts per step (block size {block})"
        if rule == "match":
            cmd += ["--spec-orthrus-match"]
            note += "; sampled requests keep drafts by token matching"
        if per_slot:
            cmd += ["--spec-orthrus-per-slot"]
            note += "; one diffusion forward per slot (the old path)"
    if exact_kernels():
        # the exact CPU kernels must also compute every op of a CPU layer: op offload would
        # send batches of >= 32 rows to a GPU's kernels, which are not batch-invariant (a
        # later --op-offload in extra wins)
        cmd += ["--no-op-offload"]
    return cmd + [str(a) for a in extra], note


def check_draft_max(value, block: int) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise OrthrusError(f"--draft-max must be an integer, 'auto' or 'off', got {value!r}") from None
    if not 1 <= n <= block - 1:
        raise OrthrusError(f"--draft-max must be in [1, {block - 1}] (block size - 1 of the GGUF), "
                           f"'auto' or 'off', got {n}")
    return n


def check_port(port, host: str | None = "127.0.0.1") -> None:
    """port is a TCP port number; with a host, also one that nothing listens on there now
    (else llama-server would fail to bind, or serve would mistake another server for it)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise OrthrusError(f"--port must be an integer in [1, 65535], got {port!r}")
    if host is None:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise OrthrusError(f"--host {host!r} does not resolve ({e}): give an address such as 127.0.0.1 "
                           "or 0.0.0.0") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as llama-server binds
        try:
            sock.bind(addr)
        except OSError as e:
            raise OrthrusError(f"cannot listen on {host}:{port}: {e.strerror or e}; another server "
                               "probably uses the port: stop it or choose another --port") from None


def _die_with_parent(parent: int):
    """For Popen's preexec_fn on Linux: the child gets SIGKILL when the thread that started
    it ends, even by SIGKILL, so that no llama-server outlives serve (SIGTERM would not do:
    llama-server waits for an open stream first, about 30 s). Everything the hook
    needs is looked up here, in the parent: between fork and exec the child must not import
    or take locks another thread may hold."""
    import ctypes
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    getppid, exit_ = os.getppid, os._exit

    def hook():
        prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if getppid() != parent:  # the parent died before the call
            exit_(1)
    return hook


class Server:
    """One llama-server process: `with Server(cmd) as s: ... s.url`."""

    def __init__(self, cmd: list[str], host: str = "127.0.0.1", port: int = 8080,
                 log: str | Path | None = None, timeout: float = 120.0, env: dict | None = None):
        self.cmd, self.host, self.port, self.timeout = cmd, host, port, timeout
        self.env = with_cpu_defaults(dict(os.environ) if env is None else env)
        self.log_path = Path(log) if log else None
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "Server":
        out = None
        if self.log_path is not None:
            self._log = open(self.log_path, "wb")
            out = self._log
        check_port(self.port, self.host)  # a busy port: a clear error, not another server's /health
        # its own session: Ctrl-C reaches only us, and we stop it in order; on Linux it also
        # dies with us if we are killed outright
        hook = _die_with_parent(os.getpid()) if sys.platform.startswith("linux") else None
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT if out else None,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=self.env,
                                     preexec_fn=hook)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise OrthrusError(f"llama-server exited with status {self.proc.returncode} before it "
                                   f"was ready{self._tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200 and self.proc.poll() is None:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise OrthrusError(f"llama-server did not answer {self.url}/health within "
                                   f"{self.timeout:.0f} s{self._tail()}")
            time.sleep(0.1)

    def _tail(self, n: int = 3000) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return ":\n" + self.log_path.read_bytes()[-n:].decode(errors="replace")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM; llama-server finishes open streams first, and stops at once on a second
        signal, which comes after a second; SIGKILL if it is still there after `grace`."""
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(min(1.0, grace))
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(max(0.0, grace - 1.0))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def exact_kernels(env=None) -> bool:
    """Whether llama-server runs on the batch-invariant CPU kernels: yes unless the environment
    has GGML_CPU_USE_REF=0 (server_env's default)."""
    return (os.environ if env is None else env).get("GGML_CPU_USE_REF", "1") != "0"


def server_env() -> dict:
    """As in the Python API: batch-invariant CPU kernels, so greedy drafting is token-identical
    to plain decoding (docs/NUMERICS.md); GGML_CPU_USE_REF=0 in the environment opts out."""
    env = dict(os.environ)
    env["GGML_CPU_USE_REF"] = "1" if exact_kernels(env) else "0"
    return with_cpu_defaults(env)


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8080,
          draft_max: int | str | None = None, n_parallel: int | None = None,
          extra: tuple[str, ...] | list[str] = (), echo=print, rule: str = "speculative") -> int:
    """Run llama-server in the foreground with Orthrus drafting until Ctrl-C (or it exits)."""
    if not Path(model).is_file():
        raise OrthrusError(f"{model}: no such file")
    check_extra(extra)
    cmd, note = server_command(model, host, port, draft_max, n_parallel, extra, rule=rule)
    echo(note)
    server = Server(cmd, host, port, timeout=600.0, env=server_env())
    # Ctrl-C (even where the shell started us with SIGINT ignored), SIGTERM (a service
    # manager), SIGHUP (the terminal closed) and SIGQUIT all stop the server in order;
    # SIGKILL cannot be caught: the server's death signal (Linux) covers it
    sigs = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, n)]
    old = {sig: signal.signal(sig, raise_signal) for sig in sigs}
    try:
        server.start()
        echo(f"serving {model} at {server.url} (OpenAI API under {server.url}/v1); Ctrl-C stops it")
        rc = server.proc.wait()
        echo(f"llama-server exited with status {rc}")
        return rc
    except KeyboardInterrupt:
        echo("stopping llama-server")
        return 0
    finally:
        server.stop()
        for sig, handler in old.items():
            signal.signal(sig, handler)
