"""Compute: one forward for a batch of sequences through playlist positions [start, stop).

Each sequence brings its own state and input (token ids, or hidden states [T, E] from an
earlier stage), of any length and at any position. Rows of all sequences are laid end to
end, so every block is fetched from residency once per step and each weight, and each
routed expert, is read once for the whole batch; attention and the recurrent mixers run per
sequence on its own caches. The embedding and the head are optional ends: a stage given
hidden states that asks for no logits never loads them. A residency limited to positions
[a, b) (a pipeline stage) runs only those; start and stop default to them.

Prefill is layer-major: a step takes the next chunk (at most `prefill_chunk` rows) of every
sequence that has one through all positions, so each layer is read once per chunk.

`Compute.probe` (None unless set) is told before and after the embedding, each position and
the head of every step: `lemonslice profile` times and counts reads per layer through it.
"""

from __future__ import annotations

from typing import Literal, Protocol, Sequence, Union

import torch

from ..errors import LemonsliceError
from ..models.caches import spans
from .residency import Residency
from .state import SequenceState

# Prompt tokens per layer-major prefill chunk: bounds activation memory (the attention
# scores of one chunk are [H, chunk, context]).
PREFILL_CHUNK = 512

# Token ids (a list or 1-D integer tensor), or hidden states [T, E] (a float tensor).
Input = Union[Sequence[int], torch.Tensor]
Logits = Literal["last", "all"]
# A part of one forward step: "embedding", a playlist position, or "head".
Part = Union[int, str]


class Probe(Protocol):
    """Told before and after each part of a forward (a profiler's timer and read counters)."""

    def enter(self, part: Part) -> None: ...

    def leave(self, part: Part, rows: int) -> None: ...


def _rows(x: Input) -> torch.Tensor:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        if x.dim() != 2:
            raise LemonsliceError(f"hidden states must be [T, E], got {x.dim()} dimensions")
        return x
    return torch.as_tensor(x if isinstance(x, torch.Tensor) else list(x), dtype=torch.long).reshape(-1)


class Compute:
    """Runs batches of sequence states over the blocks that residency hands out."""

    def __init__(self, residency: Residency, prefill_chunk: int = PREFILL_CHUNK):
        if prefill_chunk < 1:
            raise LemonsliceError("prefill_chunk must be >= 1")
        self.residency = residency
        self.prefill_chunk = prefill_chunk
        # Off unless a profiler sets it: each part then pays one `is None` test.
        self.probe: Probe | None = None
        # Positions every new state's attention caches claim at once (0: they grow as needed).
        self.reserve = 0

    def new_state(self) -> SequenceState:
        """A fresh state for the current playlist (made from hyper-parameters: no weight is read);
        positions outside the residency's range hold no cache."""
        state = SequenceState.new(self.residency.family, self.residency.cache_specs(), self.residency.positions)
        if self.reserve:
            state.reserve(self.reserve, self.prefill_chunk)
        return state

    @torch.inference_mode()
    def forward(self, states: Sequence[SequenceState], inputs: Sequence[Input], *, start: int | None = None,
                stop: int | None = None, logits: Logits | None = None) -> list[torch.Tensor]:
        """Append inputs[i] to states[i] at positions [start, stop) of the playlist (default: the
        residency's range, the whole playlist unless it was limited).

        Returns per sequence the output [T_i, E] of position stop-1 (before the final norm), or
        with `logits` the head's [T_i, V] ("all") or [1, V] of the last row ("last").
        """
        n_pos = len(self.residency.playlist)
        a, b = self.residency.positions
        start, stop = a if start is None else start, b if stop is None else stop
        if not 0 <= start < stop <= n_pos:
            raise LemonsliceError(f"positions [{start}, {stop}) are not a part of a {n_pos}-position playlist")
        if not a <= start < stop <= b:
            raise LemonsliceError(f"positions [{start}, {stop}) lie outside this engine's positions [{a}, {b})")
        if logits is not None and not self.residency.heads:
            raise LemonsliceError(f"positions [{a}, {b}) do not end the playlist: they make no logits")
        if len(states) != len(inputs) or not states:
            raise LemonsliceError(f"{len(states)} states for {len(inputs)} inputs")
        if len({id(s) for s in states}) != len(states):
            raise LemonsliceError("a sequence state appears twice in one batch")
        if any(len(s.caches) != n_pos for s in states):
            raise LemonsliceError(f"a state was made for another playlist than this {n_pos}-position one")
        xs = [_rows(x) for x in inputs]
        if any(x.shape[0] == 0 for x in xs):
            raise LemonsliceError("no token ids given")
        if not self.residency.embeds and any(not x.is_floating_point() for x in xs):
            raise LemonsliceError(f"positions [{a}, {b}) do not start the playlist: give hidden states [T, E], "
                                  "not token ids")
        C = self.prefill_chunk
        outs: list[list[torch.Tensor]] = [[] for _ in xs]
        for step in range(0, max(x.shape[0] for x in xs), C):
            active = [i for i, x in enumerate(xs) if step < x.shape[0]]
            parts = [xs[i][step : step + C] for i in active]
            lengths = [p.shape[0] for p in parts]
            y = self._blocks(self._embed(parts), [states[i] for i in active], lengths, start, stop)
            for i, (s, e) in zip(active, spans(lengths)):
                # Only the last row is wanted: a long prompt's earlier rows ([T, E] each) are not kept.
                outs[i] = [y[s:e]] if logits == "last" else outs[i] + [y[s:e]]
        hidden = [o[0] if len(o) == 1 else torch.cat(o) for o in outs]
        if logits is None:
            return hidden
        rows = [h[-1:] if logits == "last" else h for h in hidden]
        if self.probe is not None:
            self.probe.enter("head")
        out = self.residency.shared.logits(rows[0] if len(rows) == 1 else torch.cat(rows))  # one head pass
        if self.probe is not None:
            self.probe.leave("head", out.shape[0])
        return [out[s:e] for s, e in spans([r.shape[0] for r in rows])]

    def _embed(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The rows of one step laid end to end [N, E]; token ids go through the embedding."""
        if self.probe is not None:
            self.probe.enter("embedding")
        if all(not p.is_floating_point() for p in parts):
            x = self.residency.shared.embed(parts[0] if len(parts) == 1 else torch.cat(parts))
        else:
            rows = [p if p.is_floating_point() else self.residency.shared.embed(p) for p in parts]
            x = rows[0] if len(rows) == 1 else torch.cat(rows)
        if self.probe is not None:
            self.probe.leave("embedding", x.shape[0])
        return x

    def _blocks(self, x: torch.Tensor, states: list[SequenceState], lengths: list[int], start: int,
                stop: int) -> torch.Tensor:
        playlist = self.residency.playlist
        probe = self.probe
        for pos in range(start, stop):
            if probe is not None:
                probe.enter(pos)
            self.residency.prefetch(pos, x)
            block = self.residency.block(playlist[pos])
            x = block.run(x, [s.caches[pos] for s in states], lengths)
            # Drop the block before the next is read, so streaming holds one layer at a time.
            del block
            if probe is not None:
                probe.leave(pos, x.shape[0])
        return x
