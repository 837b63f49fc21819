"""One pipeline stage: the ordinary Engine limited to playlist positions [a, b), in a Ray actor.

The driver makes `Stage` a Ray actor on a node that holds the stage's files. `open` checks
those files against the manifest (only they, not the whole split) and opens the engine,
which reads only its own layers (and the embedding or the head at the ends). `forward`
appends token ids (first stage) or hidden states [T, E] float32 to one sequence's state and
returns hidden states, or logits on the last stage. States are kept per sequence id.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine import Engine, SequenceState, runtime
from ..engine.budget import detect_budget, peak_rss, rss
from ..engine.compute import PREFILL_CHUNK
from ..errors import LemonsliceError
from ..gguf.constants import SHARED_FILE
from ..gguf.manifest import load_manifest
from ..slicing.verify import check_file, sha256_file

__all__ = ["OUTPUTS", "Stage"]

# What `forward` hands back: hidden states, the head's logits of the last row or of every row, or nothing.
OUTPUTS = ("hidden", "last", "all", "none")


class Stage:
    """Playlist positions [a, b) of `model` (stage `index` of `count`). `options`: max_memory,
    threads, exact, kv_types, prefill_chunk, playlist, as the driver was given them."""

    def __init__(self, index: int, count: int, model: str, positions: tuple[int, int], options: dict[str, Any]):
        self.index, self.count, self.model = index, count, model
        self.positions = (int(positions[0]), int(positions[1]))
        self.options = dict(options)
        self.engine: Engine | None = None
        self.states: dict[int, SequenceState] = {}
        self.rss_before_open = 0

    @property
    def label(self) -> str:
        a, b = self.positions
        return f"stage {self.index + 1} of {self.count} (positions {a}-{b - 1}) on {socket.gethostname()}"

    def where(self) -> dict[str, Any]:
        """This actor's process and node."""
        import ray

        return {"pid": os.getpid(), "host": socket.gethostname(), "ip": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def ping(self) -> int:
        return os.getpid()

    def open(self) -> dict[str, Any]:
        """Check this stage's files and open its engine; then `report()`."""
        try:
            o = self.options
            runtime.setup(exact=True if o.get("exact") else None, kv_types=tuple(o.get("kv_types") or ("f16", "f16")))
            self.rss_before_open = rss()
            self._check_files()
            budget = o.get("max_memory")
            if budget is None:
                budget = detect_budget()[0]
            self.engine = Engine(self.model, max_memory=budget, playlist=o.get("playlist"), positions=self.positions,
                                 prefill_chunk=o.get("prefill_chunk", PREFILL_CHUNK))
            runtime.setup(threads=o.get("threads"), compact_heap=self.engine.streaming)
        except LemonsliceError as e:
            raise LemonsliceError(f"{self.label}: {e}") from None
        return self.report()

    def _check_files(self) -> None:
        """shared.gguf and this range's layer files against the manifest (sizes and headers; with
    the `verify` option their sha256 too), before any read: only this stage's files."""
        directory = Path(self.model)
        if not directory.is_dir():
            return
        m = load_manifest(directory)
        blocks = set(self.options["playlist"][self.positions[0]:self.positions[1]])
        for f in m.files:
            if f.name == SHARED_FILE or f.layer in blocks:
                problems = check_file(directory, directory.resolve(), f)
                if problems:
                    p = problems[0]
                    raise LemonsliceError(f"{directory / p.file}: {p.kind}: {p.detail}")
                if self.options.get("verify") and sha256_file(directory / f.name) != f.sha256:
                    raise LemonsliceError(f"{directory / f.name}: altered: its sha256 is not the manifest's")

    def forward(self, seq: int, x: Any, out: str = "hidden") -> np.ndarray | None:
        """Append `x` (token ids, or hidden states [T, E]) to sequence `seq`'s state through this
        stage's positions; what `out` asks for, as float32 numpy."""
        ys = self.forward_many([seq], [x], out)
        return None if ys is None else ys[0]

    def forward_many(self, seqs: list[int], xs: list[Any], out: str = "hidden") -> list[np.ndarray] | None:
        """Several sequences in one batched step (a server's slots): xs[i] (token ids, or hidden
        states [T, E]) goes to sequence seqs[i]; one answer per sequence, as `out` asks."""
        if self.engine is None:
            raise LemonsliceError(f"{self.label}: not opened")
        if out not in OUTPUTS:
            raise LemonsliceError(f"{self.label}: unknown output {out!r}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only arrays from the object store
            xs = [torch.from_numpy(x) if isinstance(x, np.ndarray) else x for x in xs]
        for q in seqs:
            if q not in self.states:  # a sequence's caches are made on its first step here
                self.states[q] = self.engine.new_state()
        states = [self.states[q] for q in seqs]
        try:
            ys = self.engine.forward_batch(states, xs, logits=out if out in ("last", "all") else None)
        except LemonsliceError as e:
            raise LemonsliceError(f"{self.label}: {e}") from None
        return None if out == "none" else [y.numpy() for y in ys]

    def drop(self, seq: int) -> None:
        """Forget sequence `seq`."""
        self.states.pop(seq, None)

    def report(self) -> dict[str, Any]:
        """What this stage holds: weights by kind, files opened, peak RSS (VmHWM), I/O counters."""
        e = self.engine
        assert e is not None
        r = e.residency
        return {**self.where(), "index": self.index, "positions": self.positions, "streaming": e.streaming,
                "weight_bytes": e.weight_bytes, "shared_bytes": r.shared_bytes,
                "layer_bytes": e.store.resident_bytes - r.shared_bytes, "resident_bytes": e.store.resident_bytes,
                "peak_resident_bytes": e.store.peak_resident_bytes,
                "files": sorted(os.path.basename(p) for p in e.store.open_files()),
                "rss_before_open": self.rss_before_open, "peak_rss": peak_rss() or 0, "io": r.io_counters(),
                "sequences": len(self.states)}
