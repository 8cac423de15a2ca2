import os
from contextlib import contextmanager
from pathlib import Path


class OrthrusError(Exception):
    """Every error orthrus-gguf raises on purpose: the message says what failed and what to do."""


def check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    """An integer argument (not a bool) >= lo (and <= hi), or an OrthrusError naming it."""
    import numbers
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    if not ok:
        want = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise OrthrusError(f"{name} must be an integer {want}, got {value!r}")
    return int(value)


def check_number(name: str, value, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False) -> float:
    """A finite real argument (not a bool) >= lo (> lo if lo_open, and <= hi), or an
    OrthrusError naming it."""
    import math

    import numpy as np
    if lo is not None and hi is not None:
        want = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    elif lo is not None:
        want = f"{'>' if lo_open else '>='} {lo:g}"
    else:
        want = "a finite number"
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer))
            or not math.isfinite(value)):
        raise OrthrusError(f"{name} must be a finite number{'' if lo is None else ' ' + want}, got {value!r}")
    if (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and value > hi):
        raise OrthrusError(f"{name} must be {want}, got {value!r}")
    return float(value)


def utf8(text, what: str) -> bytes:
    """A str as UTF-8 (bytes-like passes as is), or an OrthrusError naming `what`: a lone
    surrogate (from a non-UTF-8 command line, or "\\udcff") has no UTF-8 form."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    if not isinstance(text, str):
        raise OrthrusError(f"{what} must be a str or bytes, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise OrthrusError(f"{what} is not valid Unicode: {e.object[e.start:e.end]!r} at character "
                           f"{e.start} has no UTF-8 form (a lone surrogate: was the input UTF-8?)") from None


def utf8_text(data: bytes, what: str) -> str:
    """UTF-8 bytes (a prompt or grammar file) as text, or an OrthrusError naming `what` and
    the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OrthrusError(f"{what} is not UTF-8 text: byte {data[e.start]:#04x} at offset {e.start} "
                           f"({e.reason}); convert it first, e.g. with iconv -t UTF-8") from None


class Signalled(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, raised like Ctrl-C so every cleanup (temporary files, child
    processes) runs on the way out."""
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_signalled: list[int] = []  # the signals the CLI's handlers have seen, in order


def raise_signal(signum, frame=None):
    """The CLI's handler for the stop signals: note the signal, then raise Signalled. The
    note lets code that catches a library's error tell an interruption inside the library
    (which may come back wrapped in the library's own exception) from a real failure."""
    _signalled.append(signum)
    raise Signalled(signum)


def interruption() -> Signalled | None:
    """The Signalled to raise again if a stop signal arrived since the last call (None
    otherwise); the note is consumed."""
    if not _signalled:
        return None
    signum = _signalled[-1]
    _signalled.clear()
    return Signalled(signum)


@contextmanager
def temporary_beside(parent: Path, prefix: str, suffix: str = "", directory: bool = False):
    """A new file (or folder) in parent, removed when the block ends unless the block moved it
    away. A stop signal is an exception raised between any two bytecodes, so the path is named
    before it is created and the removal covers the creation itself: a signal can never leave
    it behind, as it could between tempfile.mkstemp's (or mkdtemp's) creating and returning."""
    import secrets
    import shutil
    path = Path(parent) / f"{prefix}{os.getpid()}-{secrets.token_hex(6)}{suffix}"
    try:
        try:
            if directory:
                path.mkdir(mode=0o700)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:  # not ours (pid and 48 random bits make this all but impossible)
            path = None
            raise
        yield path
    finally:
        if path is not None:
            if directory:
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
