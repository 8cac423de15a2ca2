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
