"""Perplexity the way llama.cpp's `llama-perplexity` computes it.

The text is tokenized once (with BOS when the vocabulary asks for it) and cut into
non-overlapping windows of `ctx` tokens; the first token of each window is replaced by
BOS. Each window starts from a fresh state and only its second half is scored: the
log-probability of token j+1 from the logits at j, for j in [ctx/2, ctx-1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..engine import Engine
from ..errors import LemonsliceError


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    scored: int  # tokens scored
    windows: int
    ctx: int
    window_ppl: tuple[float, ...]  # running perplexity after each window, as llama.cpp prints it
    ppl_err: float = 0.0  # llama-perplexity's "+/-": the standard error of the mean NLL, scaled by ppl


def ppl_uncertainty(nll_sum: float, nll2_sum: float, count: int) -> float:
    """llama-perplexity's "Final estimate" uncertainty: with m = mean NLL and m2 = mean squared
    NLL over the scored tokens, ppl * sqrt((m2 - m^2) / (count - 1))."""
    if count < 2:
        return math.nan
    m, m2 = nll_sum / count, nll2_sum / count
    return math.exp(m) * math.sqrt(max(m2 - m * m, 0.0) / (count - 1))


SCORE_CHUNK = 512  # scored positions per forward


def _windows(tokens: Sequence[int], ctx: int, max_windows: int | None) -> int:
    if ctx < 4:
        raise LemonsliceError(f"--ctx must be at least 4, got {ctx}")
    if len(tokens) < 2 * ctx:
        raise LemonsliceError(
            f"the text has {len(tokens)} tokens; perplexity with a context of {ctx} needs at least {2 * ctx}"
        )
    windows = len(tokens) // ctx
    return windows if max_windows is None else min(windows, max_windows)


def _scored(engine: Engine, tokens: Sequence[int], ctx: int, bos_id: int | None,
            windows: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(window, targets [n], logits [n, V]) for every scored piece, llama-perplexity's way."""
    first = ctx // 2
    for w in range(windows):
        ids = list(tokens[w * ctx : (w + 1) * ctx])
        if bos_id is not None:
            ids[0] = bos_id
        engine.reset()
        engine.forward(ids[:first])  # the first half only builds state; its logits are not needed
        # The rest of the window (all of it is fed, as llama-perplexity does) in pieces: logits
        # [SCORE_CHUNK, V] at a time, not [ctx / 2, V] (4.3 GB at 8K with a 262k vocabulary).
        for s in range(first, ctx, SCORE_CHUNK):
            e = min(s + SCORE_CHUNK, ctx)
            targets = torch.tensor(ids[s + 1 : e + 1], dtype=torch.long)  # [n], n = e - s or e - s - 1
            yield w, targets, engine.forward(ids[s:e], all_logits=True)[: len(targets)]  # [n, V]


class _NLL:
    """The running negative log-likelihood of the targets, per window as llama-perplexity prints it."""

    def __init__(self, ctx: int, windows: int):
        self.ctx, self.windows = ctx, windows
        self.nll, self.nll2, self.count, self.running = 0.0, 0.0, 0, []

    def add(self, w: int, targets: torch.Tensor, logits: torch.Tensor) -> None:
        # log p(target) = logit - logsumexp, per row; the running sum is kept in double.
        lse = torch.logsumexp(logits, dim=-1)  # [n]
        tok_nll = (lse - logits.gather(1, targets[:, None])[:, 0]).double()  # [n]
        self.nll += float(tok_nll.sum())
        self.nll2 += float((tok_nll * tok_nll).sum())
        self.count += len(targets)
        self.running[w:] = [math.exp(self.nll / self.count)]  # a window's entry ends with its last piece

    def result(self) -> PerplexityResult:
        n = self.count
        return PerplexityResult(math.exp(self.nll / n), self.nll / n, n, self.windows, self.ctx, tuple(self.running),
                                ppl_uncertainty(self.nll, self.nll2, n))


def perplexity(
    engine: Engine,
    tokens: Sequence[int],
    ctx: int,
    bos_id: int | None,
    max_windows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    windows = _windows(tokens, ctx, max_windows)
    acc = _NLL(ctx, windows)
    for w, targets, logits in _scored(engine, tokens, ctx, bos_id, windows):
        acc.add(w, targets, logits)
        if progress is not None:
            progress(w + 1, windows)
    return acc.result()


@dataclass(frozen=True)
class KLResult:
    """How far one model's next-token distributions are from a base model's, over the positions
    perplexity scores (llama-perplexity --kl-divergence reports the same quantities)."""

    kld: float  # mean KL(base || model) per position, nats
    kld_err: float  # standard error of that mean
    kld_max: float
    top1: float  # fraction of positions where both models' most likely tokens agree
    model: PerplexityResult
    base: PerplexityResult


def kl_divergence(
    engine: Engine,
    base: Engine,
    tokens: Sequence[int],
    ctx: int,
    bos_id: int | None,
    max_windows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> KLResult:
    """KL(base || engine) of the next-token distributions at every scored position, with both
    models' perplexities; the two run window by window in step, on the same tokens."""
    windows = _windows(tokens, ctx, max_windows)
    mine, theirs = _NLL(ctx, windows), _NLL(ctx, windows)
    kl, kl2, kl_max, agree = 0.0, 0.0, 0.0, 0
    pieces = zip(_scored(engine, tokens, ctx, bos_id, windows), _scored(base, tokens, ctx, bos_id, windows))
    for (w, targets, logits), (_, _, base_logits) in pieces:
        if logits.shape != base_logits.shape:
            raise LemonsliceError(f"the models' vocabularies differ ({logits.shape[-1]} and {base_logits.shape[-1]})")
        mine.add(w, targets, logits)
        theirs.add(w, targets, base_logits)
        lp = torch.log_softmax(logits.double(), dim=-1)  # [n, V]
        lq = torch.log_softmax(base_logits.double(), dim=-1)  # [n, V]
        tok_kl = (lq.exp() * (lq - lp)).sum(-1)  # [n]
        kl += float(tok_kl.sum())
        kl2 += float((tok_kl * tok_kl).sum())
        kl_max = max(kl_max, float(tok_kl.max()))
        agree += int((logits.argmax(-1) == base_logits.argmax(-1)).sum())
        if progress is not None:
            progress(w + 1, windows)
    n = mine.count
    mean = kl / n
    err = math.sqrt(max(kl2 / n - mean * mean, 0.0) / (n - 1)) if n > 1 else math.nan
    return KLResult(mean, err, kl_max, agree / n, mine.result(), theirs.result())
