"""A Hugging Face checkpoint directory: config.json and safetensors shards read lazily.

Tensors are found through `model.safetensors.index.json` when present (else every
`*.safetensors` file is scanned) and loaded one at a time; shapes come from the shard
headers without reading any data.
"""

from __future__ import annotations

import json
import logging
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LemonsliceError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LemonsliceError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


class HFCheckpoint:
    """`config` is the root config.json; `hparams` merges its `text_config` over it.

    Shards are found on first use, so a bad config is reported before any shard is read."""

    def __init__(self, path: Path, config: dict[str, Any]):
        self.path = path
        self.config = config
        self._handles: dict[Path, Any] = {}

    @classmethod
    def open(cls, path: str | Path) -> "HFCheckpoint":
        path = Path(path)
        if not path.exists():
            raise LemonsliceError(f"{path}: no such directory")
        if not path.is_dir():
            raise LemonsliceError(f"{path}: not a directory (expected a Hugging Face checkpoint directory)")
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise LemonsliceError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
        config = read_json(cfg_path)
        if not isinstance(config, dict):
            raise LemonsliceError(f"{cfg_path}: expected a JSON object")
        return cls(path, config)

    @cached_property
    def shards(self) -> dict[str, Path]:
        """Tensor name -> shard file."""
        return _find_shards(self.path)

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else str(self.config.get("model_type", "?"))

    @property
    def hparams(self) -> dict[str, Any]:
        """The text model's settings: `text_config` lifted over the root, as llama.cpp does."""
        text = self.config.get("text_config")
        return {**self.config, **text} if isinstance(text, dict) else dict(self.config)

    def names(self) -> list[str]:
        return list(self.shards)

    def _handle(self, name: str) -> Any:
        from safetensors import safe_open

        shard = self.shards[name]
        if shard not in self._handles:
            self._handles[shard] = safe_open(shard, framework="pt")
        return self._handles[shard]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def load(self, name: str) -> torch.Tensor:
        """One tensor, as float32 (llama.cpp's converter also computes in float32 for bf16 sources)."""
        import torch

        t = self._handle(name).get_tensor(name)
        return t if t.dtype == torch.float32 else t.to(torch.float32)

    def load_rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """`t[:, lo:hi]` of a 3-D tensor, reading only that part; float32."""
        import torch

        return self._handle(name).get_slice(name)[:, lo:hi, :].to(torch.float32).contiguous()

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _find_shards(path: Path) -> dict[str, Path]:
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LemonsliceError(f"{index}: no weight_map")
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise LemonsliceError(f"{path}: shard {missing[0]} named in {INDEX_NAME} is missing")
        return {name: path / f for name, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LemonsliceError(f"{path}: no *.safetensors files (only safetensors checkpoints are supported)")
    from safetensors import safe_open

    shards: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as h:
                for name in h.keys():
                    shards[name] = f
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise LemonsliceError(f"{f}: unreadable safetensors file ({e})") from None
    return shards
