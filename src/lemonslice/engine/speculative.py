"""Speculative decoding with the model's own MTP (nextn) head as the drafter.

Each step drafts K tokens with the MTP head (`models.qwen35_mtp.MTPHead`), then runs the
trunk once over [last token, d1..dK] and keeps the longest prefix the trunk agrees with,
plus one token of its own. Greedy output is the trunk's greedy output; with sampling, the
drafts go through standard speculative sampling (accept d with min(1, p(d)/q(d)), else
draw from max(0, p - q)), so the output follows the trunk's sampling distribution. The step
is a `generation.Decoder`: the one decode loop (`generation.decode`) drives it like plain
decoding, handing each step's last token back to the next verify pass.

State after a partial accept: the sequence state is marked before the verify pass and
truncated to the accepted tokens after it (`SequenceState.truncate`): attention KV caches
forget the rejected tail, and Gated DeltaNet states are rebuilt from the state at the mark
and what the accepted tokens fed the delta rule during verification. No block is re-run and
no weight is read, so a streamed model pays nothing for a rollback.

The MTP head has its own KV cache. Pair t of that cache is (final-normed trunk state h_t,
token x_{t+1}) at position t, as in training; draft steps after the first pair each drafted
token with the head's own output state and are dropped from the cache before the next
step, which re-adds the accepted pairs with the trunk's states.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import LemonsliceError
from ..models.qwen35_args import ModelArgs as Qwen35Args
from ..models.qwen35_layers import rms_norm
from ..models.qwen35_mtp import MTPHead
from .engine import Engine
from .generation import GenStats
from .state import SequenceState
from .sampling import Sampler, SamplingParams, argmax, filter_logits

MAX_DRAFT = 16

__all__ = ["MAX_DRAFT", "SpecStats", "Speculator", "generate", "load_mtp_head"]


@dataclass
class SpecStats(GenStats):
    """What one speculative `generate` did. `accepted_hist[j]` counts the steps that kept j drafts.

    prefill covers the trunk's prompt pass; decode (the MTP head's prompt pass included) counts
    the tokens fed after it: at the length limit, all but the last.
    """

    draft_max: int = 0
    steps: int = 0  # verify passes of the trunk
    drafted: int = 0
    accepted: int = 0
    accepted_hist: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.decode_tokens / self.steps if self.steps else 0.0


def load_mtp_head(engine: Engine) -> MTPHead:
    """The MTP head of the engine's model (its first nextn block), read from the engine's store."""
    args = engine.args
    if not isinstance(args, Qwen35Args):
        raise LemonsliceError(f"speculative decoding with MTP needs a qwen35 or qwen35moe model, not {args.arch}")
    if args.nextn_predict_layers < 1:
        raise LemonsliceError(f"{engine.store.path} has no MTP block (nextn_predict_layers is 0); "
                              "add one with `lemonslice mtp inject`")
    return MTPHead(args, args.n_layer, engine.residency.load_layer(args.n_layer), engine.shared)


class _Chooser:
    """Picks tokens and gives the distributions speculative sampling compares (greedy when
    there is no sampler or its temperature is 0)."""

    def __init__(self, sampler: Sampler | None):
        self.params: SamplingParams | None = sampler.params if sampler is not None else None
        self.greedy = self.params is None or self.params.temperature == 0.0
        p = self.params
        # Without penalties the filters always keep the largest logit (as `Sampler.sample`).
        self.plain = p is None or (p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
                                   and p.frequency_penalty == 0.0)
        self.gen = None
        if not self.greedy:
            self.gen = torch.Generator().manual_seed(sampler.seed)

    def _filtered(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        return logits if self.params is None else filter_logits(logits, history, self.params)

    def greedy_pick(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        return argmax(logits if self.plain else self._filtered(logits, history))

    def probs(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """[V] float64 probabilities after the filters and temperature."""
        x = self._filtered(logits.float(), history).double()
        return torch.softmax(x / self.params.temperature, dim=0)

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.gen, dtype=torch.float64))


class Speculator:
    """An engine plus its MTP head, loaded once. `decoder` gives the speculative step that
    `generation.decode` (the one decode loop) drives; `generate` is one whole generation."""

    def __init__(self, engine: Engine, head: MTPHead | None = None):
        self.engine = engine
        self.head = head if head is not None else load_mtp_head(engine)

    def decoder(self, sampler: Sampler | None, draft_max: int) -> "_Speculative":
        if not 1 <= draft_max <= MAX_DRAFT:
            raise LemonsliceError(f"draft_max must be in [1, {MAX_DRAFT}], got {draft_max}")
        return _Speculative(self, sampler, draft_max)

    def generate(
        self, ids: Sequence[int], n: int, draft_max: int, sampler: Sampler | None = None,
    ) -> tuple[list[int], SpecStats]:
        """The `n` tokens that follow `ids` (from a fresh state), drafting up to `draft_max` per step."""
        from .generation import Session

        self.decoder(sampler, draft_max)  # the argument checks, before any work
        ids = [int(t) for t in ids]
        if not ids:
            raise LemonsliceError("no token ids given")
        if n <= 0:
            return [], SpecStats(draft_max=draft_max, accepted_hist=[0] * (draft_max + 1))
        session = Session(self.engine, self, draft_max)
        greedy = Sampler(SamplingParams(temperature=0.0))
        new = list(session.generate(ids, sampler if sampler is not None else greedy, n))
        return new, session.stats


class _Speculative:
    """The speculative step (a `generation.Decoder`): each step drafts up to K tokens with the
    MTP head, verifies [last token, d1..dK] in one trunk pass and returns the accepted drafts
    plus the trunk's own next token. The state is always fresh: no reuse between turns."""

    def __init__(self, spec: Speculator, sampler: Sampler | None, draft_max: int):
        self.eng, self.head, self.draft_max = spec.engine, spec.head, draft_max
        self.choose = _Chooser(sampler)
        self.stats = SpecStats(draft_max=draft_max, accepted_hist=[0] * (draft_max + 1))
        self.cache = self.head.new_cache()

    @property
    def n_past(self) -> int:
        return self.eng.state.n_past

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> None:
        self.prompt = ids
        self.x = _hidden(self.eng, self.eng.state, ids)  # [P, E]

    @torch.inference_mode()
    def step(self, last: int | None, history: list[int], budget: int) -> list[int]:
        if last is None:
            return [self._first(history, budget)]
        eng, head, choose, stats = self.eng, self.head, self.choose, self.stats
        k = min(self.draft_max, budget - 1)  # a verify pass yields up to k + 1 tokens
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        if k > 0:
            d_logits, g = head(torch.tensor(self.pend_ids), self.pend_h, self.cache, "last")
            committed = self.cache.length
            for i in range(k):
                if i:
                    d_logits, g = head(torch.tensor(drafts[-1:]), g[-1:], self.cache)
                if choose.greedy:
                    drafts.append(choose.greedy_pick(d_logits[-1], history + drafts))
                else:
                    qs.append(choose.probs(d_logits[-1], history + drafts))
                    drafts.append(choose.draw(qs[-1]))
            self.cache.length = committed  # draft pairs are rebuilt from the trunk's states below
            self.pend_h, self.pend_ids = self.pend_h[:0], []

        state = eng.state
        n_past = state.n_past
        state.mark()
        x = _hidden(eng, state, [last] + drafts)  # [k+1, E]
        logits = eng.shared.logits(x)  # [k+1, V]
        j, nxt = _accept(choose, logits, drafts, qs, history)
        state.truncate(n_past + j + 1)  # keeps all k+1 (and just drops the mark) when every draft holds

        stats.steps += 1
        stats.drafted += k
        stats.accepted += j
        stats.accepted_hist[j] += 1
        self.pend_h = torch.cat((self.pend_h, rms_norm(x[: j + 1], eng.shared.norm, eng.args.rms_eps)))
        self.pend_ids = self.pend_ids + drafts[:j] + [nxt]
        return drafts[:j] + [nxt]

    def _first(self, history: list[int], budget: int) -> int:
        """The token out of the prefill; the prompt's pairs go into the head's cache."""
        eng, choose, x = self.eng, self.choose, self.x
        logits = eng.shared.logits(x[-1:])[0]  # [V]
        tok = choose.greedy_pick(logits, history) if choose.greedy else choose.draw(choose.probs(logits, history))
        # Pending pairs (h_t, x_{t+1}) not yet in the head's cache; the last one drafts d1.
        self.pend_h = rms_norm(x, eng.shared.norm, eng.args.rms_eps)  # [P, E]
        self.pend_ids = self.prompt[1:] + [tok]
        if len(self.pend_ids) > 1 and budget > 1:
            self.head(torch.tensor(self.pend_ids[:-1]), self.pend_h[:-1], self.cache, None)
            self.pend_h, self.pend_ids = self.pend_h[-1:], self.pend_ids[-1:]
        del self.x
        return tok


def _accept(
    choose: _Chooser, logits: torch.Tensor, drafts: list[int], qs: list[torch.Tensor], history: list[int],
) -> tuple[int, int]:
    """(drafts kept, the trunk's own next token). logits [k+1, V]: row i follows drafts[:i]."""
    k = len(drafts)
    if choose.greedy:
        for i in range(k + 1):
            want = choose.greedy_pick(logits[i], history + drafts[:i])
            if i == k or drafts[i] != want:
                return i, want
    for i in range(k):
        p = choose.probs(logits[i], history + drafts[:i])
        q, d = qs[i], drafts[i]
        if choose.uniform() * float(q[d]) < float(p[d]):  # accept with probability min(1, p/q)
            continue
        resid = (p - q).clamp_min(0)
        # p == q everywhere leaves nothing to reject into; only reachable through rounding.
        return i, choose.draw(resid / resid.sum() if float(resid.sum()) > 0 else p)
    return k, choose.draw(choose.probs(logits[k], history + drafts))


def _hidden(eng: Engine, state: SequenceState, ids: list[int]) -> torch.Tensor:
    """The trunk's last block output [T, E] for `ids` appended to `state`."""
    return eng.compute.forward([state], [ids])[0]


_speculators: "weakref.WeakKeyDictionary[Engine, Speculator]" = weakref.WeakKeyDictionary()


def generate(
    engine: Engine, ids: Sequence[int], n: int, draft_max: int, sampler: Sampler | None = None,
) -> tuple[list[int], SpecStats]:
    """Speculative generation on `engine` with its MTP head (loaded once per engine).

    Returns the `n` new tokens and the acceptance statistics; greedy (no sampler, or
    temperature 0) gives exactly the tokens of plain greedy decoding."""
    spec = _speculators.get(engine)
    if spec is None:
        spec = _speculators[engine] = Speculator(engine)
    return spec.generate(ids, n, draft_max, sampler)
