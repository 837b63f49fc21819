"""lemonslice: run and reshape large GGUF language models one layer at a time."""

__version__ = "0.1.0"
