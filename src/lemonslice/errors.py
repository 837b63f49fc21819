"""The error type for user-facing failures outside GGUF parsing (which raises GGUFError)."""


class LemonsliceError(Exception):
    """A clear, one-line failure the CLI reports without a traceback."""
