"""A model whose output is fixed: scripted replies through the real tokenizer and template.

No real Qwen3.5 weights can be installed here, so the server's text path (template, tokenizer,
streaming detokenizer, reasoning split, tool-call parser) is tested end to end on an engine
that replays given token ids. `ReplayEngine` has what the server uses of an Engine; after a
prompt it answers with the ids of `replies[key]`, then end-of-turn, where the prompt's last
`[[reply:key]]` marker names the script (else `default`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Sequence

import torch

from lemonslice.gguf.reader import GGUFReader
from lemonslice.text.tokenizer import Tokenizer

_MARK = re.compile(r"\[\[reply:([A-Za-z0-9_-]+)\]\]")


@dataclass
class ReplayState:
    fed: list[int] = field(default_factory=list)
    script: list[int] = field(default_factory=list)
    at: int = 0  # next script position
    expected: int | None = None  # the id the last step chose (fed back when decoding)

    @property
    def n_past(self) -> int:
        return len(self.fed)

    @property
    def caches(self) -> list[Any]:
        return []


class _Residency:
    def io_counters(self) -> dict[str, float]:
        return {"bytes_read": 0}


class ReplayEngine:
    def __init__(self, vocab_gguf: str, replies: dict[str, str], ctx: int = 32768, delay_s: float = 0.0):
        self.delay_s = delay_s  # per step, for a reply that streams at a human pace
        with GGUFReader(vocab_gguf) as r:
            meta = {k: r.get(k) for k in r.kv}
        meta["qwen35.context_length"] = ctx
        self.store = SimpleNamespace(metadata=meta)
        self.args = SimpleNamespace(arch="qwen35")
        self.family, self.residency = None, _Residency()
        self.tok = Tokenizer.from_gguf(meta)
        self.end = self.tok.eos_id
        self.replies = {k: self.tok.encode(v, add_special=False, parse_special=True) for k, v in replies.items()}
        self.n_vocab = self.tok.n_vocab
        self.forwards = 0

    def new_state(self) -> ReplayState:
        return ReplayState()

    def forward_batch(self, states: Sequence[ReplayState], inputs: Sequence[Sequence[int]], *, logits: str = "last",
                      **_: Any) -> list[torch.Tensor]:
        self.forwards += 1
        time.sleep(self.delay_s)
        return [self._step(s, [int(t) for t in ids]) for s, ids in zip(states, inputs)]

    def _step(self, s: ReplayState, ids: list[int]) -> torch.Tensor:
        s.fed += ids
        if ids == [s.expected]:
            s.at += 1
        else:  # a prompt (or a part of one): choose the script from the text so far
            keys = _MARK.findall(self.tok.decode(s.fed))
            s.script = self.replies[keys[-1] if keys else "default"] + [self.end]
            s.at = 0
        s.expected = s.script[min(s.at, len(s.script) - 1)]
        out = torch.zeros(1, self.n_vocab)
        out[0, s.expected] = 100.0
        return out
