"""GGUF reading and writing (numpy only)."""

from .constants import BLOCK_SIZES, GGMLType, Keys, Role, Tensors, ValueType
from .errors import GGUFError
from .reader import GGUFReader, KVEntry, TensorInfo, open_gguf
from .writer import encode_kv, plan_file, write_gguf

__all__ = [
    "BLOCK_SIZES", "GGMLType", "GGUFError", "GGUFReader", "KVEntry", "Keys", "Role", "TensorInfo",
    "Tensors", "ValueType", "encode_kv", "open_gguf", "plan_file", "write_gguf",
]
