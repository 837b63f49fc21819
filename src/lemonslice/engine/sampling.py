"""Token sampling: validated parameters, Qwen's recommended presets, logit filters, stop strings.

The filter chain follows llama.cpp's default sampler order (`common_params_sampling::samplers`
in common/common.h): penalties -> top-k -> top-p -> min-p -> temperature -> draw. Top-p and
min-p therefore see the untempered distribution, renormalised over what top-k kept.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "PRESETS",
    "Sampler",
    "SamplingParams",
    "StopMatcher",
    "apply_min_p",
    "apply_penalties",
    "apply_top_k",
    "apply_top_p",
    "filter_logits",
]

_NEG_INF = float("-inf")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. The defaults sample the model's raw distribution.

    temperature 0 means greedy; top_k 0, top_p 1 and min_p 0 each switch that filter off.
    `penalty_last_n` is how many trailing history tokens the penalties look at
    (llama.cpp's default 64; -1 = the whole history, 0 = no penalties).
    `seed` None draws a fresh random seed per Sampler; `max_tokens` None means no cap.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = ()
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        # Accept a single string or any iterable of strings; store a tuple so params stay hashable.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "repetition_penalty", "frequency_penalty"):
            if not _is_real(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not _is_int(self.penalty_last_n) or self.penalty_last_n < -1:
            raise ValueError(
                f"penalty_last_n must be an integer >= -1 (-1 = all), got {self.penalty_last_n!r}"
            )
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SamplingParams:
        """A named preset from PRESETS, optionally with some fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown sampling preset {name!r}; choose from {', '.join(PRESETS)}")
        return PRESETS[name].replace(**overrides)


# Qwen's recommended settings per mode, as recorded in the project's seed notes.
PRESETS: dict[str, SamplingParams] = {
    "thinking-general": SamplingParams(
        temperature=1.0, top_p=0.95, top_k=20, min_p=0.0, presence_penalty=1.5,
        repetition_penalty=1.0,
    ),
    "thinking-coding": SamplingParams(
        temperature=0.6, top_p=0.95, top_k=20, min_p=0.0, presence_penalty=0.0,
        repetition_penalty=1.0,
    ),
    "instruct-general": SamplingParams(
        temperature=0.7, top_p=0.8, top_k=20, min_p=0.0, presence_penalty=1.5,
        repetition_penalty=1.0,
    ),
    "instruct-reasoning": SamplingParams(
        temperature=1.0, top_p=1.0, top_k=40, min_p=0.0, presence_penalty=1.5,
        repetition_penalty=1.0,
    ),
}


def argmax(x: torch.Tensor) -> int:
    """Index of the largest value of x [V], the first one on ties (as torch.argmax): numpy's
    vectorised scan for a CPU float32 vector (12x torch's on a 262k vocabulary)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 1 and not x.requires_grad:
        return int(x.numpy().argmax())
    return int(torch.argmax(x))


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 1 or logits.numel() == 0:
        raise ValueError(f"logits must be a non-empty 1-D tensor [V], got shape {tuple(logits.shape)}")


def apply_penalties(
    logits: torch.Tensor,
    history: Sequence[int] | torch.Tensor,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> torch.Tensor:
    """Penalise every token id that occurs in `history`.

    Repetition: positive logits are divided by the penalty, the rest multiplied (so a penalty
    > 1 always makes the token less likely). Then the presence constant is subtracted once per
    token, and the frequency constant once per occurrence (OpenAI's and llama.cpp's meaning).
    """
    _check_logits(logits)
    ids = torch.as_tensor(history, dtype=torch.long).flatten()
    if ids.numel() == 0 or (repetition_penalty == 1.0 and presence_penalty == 0.0 and frequency_penalty == 0.0):
        return logits
    if int(ids.min()) < 0 or int(ids.max()) >= logits.numel():
        raise ValueError(f"history has token ids outside the vocabulary [0, {logits.numel()})")
    seen, counts = torch.unique(ids, return_counts=True)  # [U], [U]
    seen = seen.to(logits.device)
    out = logits.clone()
    picked = out[seen]
    picked = torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty)
    out[seen] = picked - presence_penalty - frequency_penalty * counts.to(picked.dtype)
    return out


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits (-inf elsewhere); 0 or k >= V keeps everything.

    Ties with the k-th logit are all kept, so the result never depends on sort stability.
    """
    _check_logits(logits)
    if k <= 0 or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, _NEG_INF)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most probable tokens whose probability sums to >= p.

    Probabilities are renormalised over the tokens still finite; the top token always stays.
    """
    _check_logits(logits)
    if p >= 1.0:
        return logits
    # Only sort the survivors: after top-k that is a handful of tokens, not the whole vocab.
    alive = torch.isfinite(logits).nonzero().squeeze(1)  # [A]
    if alive.numel() <= 1:
        return logits
    probs = torch.softmax(logits[alive].float(), dim=0)  # [A]
    sorted_p, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_p, dim=0) - sorted_p  # mass strictly above each token
    keep_sorted = before < p
    keep_sorted[0] = True
    drop = alive[order[~keep_sorted]]
    out = logits.clone()
    out[drop] = _NEG_INF
    return out


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens with probability >= min_p * (top probability); 0 keeps everything.

    Compared in logit space (logit >= max + ln min_p), which needs no softmax.
    """
    _check_logits(logits)
    if min_p <= 0.0:
        return logits
    floor = logits.max() + math.log(min_p)
    return logits.masked_fill(logits < floor, _NEG_INF)


def _recent(history: Sequence[int] | torch.Tensor, last_n: int) -> Sequence[int] | torch.Tensor:
    if last_n == 0:
        return ()
    return history if last_n < 0 else history[-last_n:]


def filter_logits(
    logits: torch.Tensor, history: Sequence[int] | torch.Tensor, params: SamplingParams
) -> torch.Tensor:
    """Penalties then top-k, top-p, min-p (llama.cpp's default order); no temperature yet."""
    x = logits.float()  # [V]; bf16 logits would make the cumulative sums coarse
    x = apply_penalties(
        x, _recent(history, params.penalty_last_n), params.repetition_penalty,
        params.presence_penalty, params.frequency_penalty,
    )
    x = apply_top_k(x, params.top_k)
    x = apply_top_p(x, params.top_p)
    return apply_min_p(x, params.min_p)


class Sampler:
    """Draws token ids under one SamplingParams with its own seeded generator.

    Two Samplers built from the same params and seed produce the same ids for the same logits.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        # Record the seed actually used so an unseeded run can be reproduced from the log.
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._generator: torch.Generator | None = None

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def sample(self, logits: torch.Tensor, history: Sequence[int] | torch.Tensor = ()) -> int:
        """The next token id for `logits` [V], penalising tokens in `history` (oldest first)."""
        _check_logits(logits)
        p = self.params
        if (p.temperature == 0.0 and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
                and p.frequency_penalty == 0.0):
            return argmax(logits.detach())  # top-k/p and min-p always keep the largest logit
        x = filter_logits(logits.detach(), history, p)  # [V]
        if p.temperature == 0.0:
            return argmax(x)
        gen = self._generator_for(x.device)
        probs = torch.softmax(x.to(gen.device) / self.params.temperature, dim=0)  # [V]
        return int(torch.multinomial(probs, 1, generator=gen))


class StopMatcher:
    """Cuts a streamed text at the first stop string, never emitting any part of one.

    `feed` returns the text that is safe to show now; a tail that could still grow into a
    stop string is held back until the next chunk decides it (or `flush` at end of stream).
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops: tuple[str, ...] = tuple(stops)
        if any(not isinstance(s, str) or not s for s in self.stops):
            raise ValueError("stop strings must be non-empty strings")
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """(text to emit, whether a stop string was reached). After a stop, feeds emit nothing."""
        if self.stopped:
            return "", True
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            self.stopped = True
            return buf[: min(hits)], True
        hold = self._partial_tail(buf)
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """Release the held-back tail when the stream ends without a stop string."""
        out, self._held = self._held, ""
        return "" if self.stopped else out

    def _partial_tail(self, buf: str) -> int:
        # Longest suffix of buf that is a proper prefix of some stop string.
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
