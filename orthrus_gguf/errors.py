class OrthrusError(Exception):
    """Every error orthrus-gguf raises on purpose: the message says what failed and what to do."""
