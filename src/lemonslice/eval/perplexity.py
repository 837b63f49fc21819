"""Perplexity the way llama.cpp's `llama-perplexity` computes it.

The text is tokenized once (with BOS when the vocabulary asks for it) and cut into
non-overlapping windows of `ctx` tokens; the first token of each window is replaced by
BOS. Each window starts from a fresh state and only its second half is scored: the
log-probability of token j+1 from the logits at j, for j in [ctx/2, ctx-1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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


def perplexity(
    engine: Engine,
    tokens: Sequence[int],
    ctx: int,
    bos_id: int | None,
    max_windows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    if ctx < 4:
        raise LemonsliceError(f"--ctx must be at least 4, got {ctx}")
    if len(tokens) < 2 * ctx:
        raise LemonsliceError(
            f"the text has {len(tokens)} tokens; perplexity with a context of {ctx} needs at least {2 * ctx}"
        )
    windows = len(tokens) // ctx
    if max_windows is not None:
        windows = min(windows, max_windows)
    first = ctx // 2
    nll, nll2, count, running = 0.0, 0.0, 0, []
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
            logits = engine.forward(ids[s:e], all_logits=True)[: len(targets)]  # [n, V]
            # log p(target) = logit - logsumexp, per row; the running sum is kept in double.
            lse = torch.logsumexp(logits, dim=-1)  # [n]
            tok_nll = (lse - logits.gather(1, targets[:, None])[:, 0]).double()  # [n]
            nll += float(tok_nll.sum())
            nll2 += float((tok_nll * tok_nll).sum())
            count += len(targets)
        running.append(math.exp(nll / count))
        if progress is not None:
            progress(w + 1, windows)
    return PerplexityResult(math.exp(nll / count), nll / count, count, windows, ctx, tuple(running),
                            ppl_uncertainty(nll, nll2, count))
