"""The lemonslice-gguf-v1 layer-split format: split, merge, verify, inspect."""

from .inspect import inspect_path
from .manifest import Manifest, load_manifest
from .merge import merge_split
from .split import split_gguf
from .verify import Problem, verify_split

__all__ = ["Manifest", "Problem", "inspect_path", "load_manifest", "merge_split", "split_gguf", "verify_split"]
