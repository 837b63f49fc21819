"""manifest.json of a split directory: the reader lives in `gguf.manifest` (below the engine,
which maps a split's files through it); re-exported here for the slicing code."""

from ..gguf.manifest import (
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    SourceInfo,
    TensorEntry,
    check_file_name,
    load_manifest,
    parse_manifest,
)

__all__ = [
    "FileEntry", "MAX_MANIFEST_BYTES", "Manifest", "SourceInfo", "TensorEntry", "check_file_name", "load_manifest",
    "parse_manifest",
]
