"""A reply's text as it streams, split into reasoning and answer deltas.

`ReasoningStream` sees the reply piece by piece and hands out ("reasoning", text) and
("content", text) parts as soon as they are certain: a part of `<think>`/`</think>` or
whitespace that might end the reasoning is held back until the next piece decides it. The
same object, fed the whole text at once, gives the non-streamed split, so a streamed reply
and a whole one always agree.
"""

from __future__ import annotations

from .chat import THINK_CLOSE, THINK_OPEN

__all__ = ["ReasoningStream", "partial_suffix"]


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningStream:
    """Splits a reply that may start with a `<think>` block (or inside one, when the prompt
    opened it: `opened`). Reasoning is stripped at both ends, the answer at its start."""

    def __init__(self, opened: bool = False):
        self.mode = "think" if opened else "start"
        self.lead = True  # strip whitespace at the start of the current part
        self._buf = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self._buf += text
        out: list[tuple[str, str]] = []
        while True:
            if self.mode == "start" and not self._start():
                return out
            if self.mode == "think":
                if not self._think(out):
                    return out
                continue
            if self.mode == "answer":
                self._answer(out)
                return out

    def flush(self) -> list[tuple[str, str]]:
        buf, self._buf = self._buf, ""
        if self.mode == "think":
            text = buf.strip() if self.lead else buf.rstrip()
            return [("reasoning", text)] if text else []
        if self.mode == "answer" and self.lead:
            buf = buf.lstrip()
        return [("content", buf)] if buf else []

    def _start(self) -> bool:
        """Decide whether the reply opens a think block; False while undecided."""
        s = self._buf.lstrip()
        if not s or (len(s) < len(THINK_OPEN) and THINK_OPEN.startswith(s)):
            return False
        if s.startswith(THINK_OPEN):
            self._buf, self.mode, self.lead = s[len(THINK_OPEN):], "think", True
        else:
            self.mode, self.lead = "answer", False  # a reply without thinking is kept as it is
        return True

    def _think(self, out: list[tuple[str, str]]) -> bool:
        """Hand out reasoning; True when the block closed (the rest is answer)."""
        if self.lead:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return False
            self.lead = False
        i = self._buf.find(THINK_CLOSE)
        if i >= 0:
            head = self._buf[:i].rstrip()
            if head:
                out.append(("reasoning", head))
            self._buf, self.mode, self.lead = self._buf[i + len(THINK_CLOSE):], "answer", True
            return True
        keep = partial_suffix(self._buf, THINK_CLOSE)
        body = self._buf[: len(self._buf) - keep].rstrip()  # trailing space may end the block
        if body:
            out.append(("reasoning", body))
        self._buf = self._buf[len(body):]
        return False

    def _answer(self, out: list[tuple[str, str]]) -> None:
        if self.lead:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return
            self.lead = False
        if self._buf:
            out.append(("content", self._buf))
        self._buf = ""
