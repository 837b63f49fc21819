"""Hugging Face checkpoints -> GGUF (Qwen3.5: `qwen35moe`, `qwen35`)."""

from .pipeline import OUT_TYPES, ConvertResult, convert_hf

__all__ = ["OUT_TYPES", "ConvertResult", "convert_hf"]
