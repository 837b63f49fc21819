"""The `chat` command: a multi-turn REPL with line editing, a history file and slash commands.

On a terminal, lines are read with prompt_toolkit (arrow keys, Ctrl-R, a history file shared
between sessions); from a pipe, one plain line at a time. Ctrl-C during a reply stops that reply
between two tokens: what was shown stays in the conversation as the assistant's turn, and the
engine's state holds exactly the tokens it was fed, so the next turn is what it would be had the
reply ended there. A second Ctrl-C before the reply stops (a long prefill) abandons the turn: the
conversation goes back to before it and the state is rebuilt on the next turn.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from ..errors import LemonsliceError
from ..slicing.atomic import write_text
from ..text.prompt import special_kwargs
from ._app import _VERIFY_HELP, app, err
from .run import (
    _CTK_HELP, _CTV_HELP, _EXACT_HELP, _LAYERS_HELP, _MEMORY_HELP, _MODEL_HELP, _PRESET_HELP, _SEED_HELP, _TEMP_HELP,
    _TEMPLATE_HELP, _THREADS_HELP,
    _open_engine, _sampling,
    _write_out,
)

_COMMANDS = (
    ("/help", "list these commands"),
    ("/think", "toggle the template's thinking mode"),
    ("/reset", "forget the conversation"),
    ("/history", "show the conversation so far"),
    ("/save FILE", "write the conversation to FILE as JSON messages"),
    ("/exit, /quit", "leave (Ctrl-D too)"),
)
_HELP_TAIL = ("Ctrl-C stops a reply; at the prompt it clears the line. "
              "A line starting with // is sent with one / removed.")
# A command is a line whose first word is a slash and letters; "/etc/hosts?" is a message.
_COMMAND = re.compile(r"/([A-Za-z]+)(?:\s+(.*))?")


def default_history_file() -> Path:
    """$XDG_STATE_HOME/lemonslice/chat_history, else ~/.cache/lemonslice/chat_history."""
    state = os.environ.get("XDG_STATE_HOME")
    root = Path(state) if state else Path.home() / ".cache"
    return root / "lemonslice" / "chat_history"


class _Lines:
    """One line at a time: prompt_toolkit on a terminal, plain `input()` from a pipe.
    `read` returns None when the user leaves (Ctrl-D, end of input) and "" after Ctrl-C."""

    def __init__(self, history_file: Path):
        self.session = None
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            return
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        try:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            history_file.touch()
            history = FileHistory(str(history_file))
        except OSError as e:
            err.print(f"warning: history is not saved ({history_file}: {e.strerror or e})", highlight=False)
            history = InMemoryHistory()
        self.session = PromptSession(history=history)

    def read(self, prompt: str) -> Optional[str]:
        if self.session is not None:
            try:
                return self.session.prompt(prompt)
            except KeyboardInterrupt:
                return ""  # the line is dropped, as in a shell
            except EOFError:
                return None
        err.print(prompt, end="", highlight=False)
        err.file.flush()
        try:
            return input()
        except (EOFError, KeyboardInterrupt):
            return None


class _Abandon(Exception):
    """A second Ctrl-C while a reply could not stop between tokens yet (a long prefill)."""


class _CtrlC:
    """The SIGINT handler while a line is handled (prompt_toolkit has its own at the prompt).
    The first Ctrl-C asks the reply to stop between two tokens, which keeps the engine's state
    whole; a second one while the model still computes raises _Abandon; else nothing happens.
    SIGTERM still ends the program."""

    def __init__(self):
        self.pressed = self.generating = False

    def __call__(self, signum, frame) -> None:  # noqa: ANN001
        if self.pressed and self.generating:
            raise _Abandon
        self.pressed = True

    @contextmanager
    def installed(self) -> Iterator[None]:
        self.pressed = False
        old = signal.signal(signal.SIGINT, self)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)


class _Chat:
    """The conversation, the engine session and the settings one REPL works with."""

    def __init__(self, engine, tok, template, stops, sampler, params, max_tokens: int,  # noqa: ANN001
                 system: Optional[str], thinking: bool):
        from ..text.chat import has_thinking_mode
        from ..text.generate import TextGenerator

        self.sampler, self.params, self.max_tokens = sampler, params, max_tokens
        self.text = TextGenerator(engine, tok, template=template, stops=stops)
        self.session = self.text.session  # what the engine's state holds, turn after turn
        self.can_think = has_thinking_mode(template, **special_kwargs(tok))
        self.thinking = thinking and self.can_think
        self.base = [{"role": "system", "content": system}] if system else []
        self.messages = list(self.base)
        self.ctrl_c = _CtrlC()

    def prompt(self) -> str:
        return f"[thinking {'on' if self.thinking else 'off'}] > " if self.can_think else "> "

    def command(self, name: str, arg: str) -> bool:
        """Run a slash command; False when it asks to leave."""
        if name in ("exit", "quit"):
            return False
        if name == "help":
            width = max(len(c) for c, _ in _COMMANDS)
            lines = [f"  {c:<{width}}  {h}" for c, h in _COMMANDS if c != "/think" or self.can_think]
            _say("commands:\n" + "\n".join(lines) + "\n" + _HELP_TAIL)
        elif name == "think":
            if self.can_think:
                self.thinking = not self.thinking
                _say(f"thinking {'on' if self.thinking else 'off'}")
            else:
                _say("this model's chat template has no thinking mode")
        elif name == "reset":
            self.messages = list(self.base)
            self.session.reset()
            _say("conversation cleared")
        elif name == "history":
            shown = [f"{m['role']}: {m['content']}" for m in self.messages]
            _say("\n".join(shown) if shown else "(no messages)")
        elif name == "save":
            if not arg:
                _say("usage: /save FILE")
            else:
                self._save(Path(arg).expanduser())
        else:
            _say(f"unknown command /{name}; /help lists the commands")
        return True

    def _save(self, path: Path) -> None:
        try:
            write_text(path, json.dumps(self.messages, indent=1, ensure_ascii=False) + "\n")
        except (OSError, LemonsliceError) as e:  # a mistyped path must not end the chat
            _say(f"error: cannot write {path}: {getattr(e, 'strerror', None) or e}")
            return
        _say(f"saved {len(self.messages)} messages to {path}")

    def turn(self, line: str) -> None:
        """One user message and the streamed reply."""
        self.messages.append({"role": "user", "content": line})
        ask = self.text.chat(self.messages, thinking=self.thinking)
        # Ctrl-C stops the reply before another token is handed out; the state keeps what it was fed.
        gen = self.text.generate(ask, self.sampler, self.max_tokens, stop=self.params.stop,
                                 interrupted=lambda: self.ctrl_c.pressed)
        self.ctrl_c.generating = True
        try:
            for piece in gen:
                _write_out(piece.text)
        except _Abandon:
            # Stopped inside a forward pass: the state may hold part of it, so it is rebuilt next turn.
            self.messages.pop()
            self.text.reset()
            _write_out("\n")
            _say("[reply abandoned; the conversation is as before this message]")
            return
        finally:
            self.ctrl_c.generating = False
        _write_out("\n")
        # The history keeps the answer only; templates drop past reasoning anyway.
        self.messages.append({"role": "assistant", "content": gen.answer})
        s = gen.stats
        note = "interrupted; " if self.ctrl_c.pressed else ""
        _say(f"({note}{s.generated} tokens, {s.decode_tps:.2f} tokens/s, {s.reused_tokens} prompt tokens re-used)")


def _say(text: str) -> None:
    err.print(text, highlight=False)


def _repl(chat: _Chat, lines: _Lines) -> None:
    hint = "/think toggles thinking, " if chat.can_think else ""
    _say(f"type a message; {hint}/help lists the commands, /exit or Ctrl-D leaves")
    while True:
        line = lines.read(chat.prompt())
        if line is None:
            return
        text = line.strip()
        if not text:
            continue
        m = _COMMAND.fullmatch(text)
        with chat.ctrl_c.installed():
            if m and not chat.command(m.group(1).lower(), (m.group(2) or "").strip()):
                return
            if not m:
                chat.turn(text[1:] if text.startswith("//") else line)


@app.command()
def chat(
    model: Path = typer.Argument(..., help=_MODEL_HELP),
    system: Optional[str] = typer.Option(None, "--system", help="System message."),
    thinking: bool = typer.Option(
        True, "--thinking/--no-thinking", help="Start with thinking on (toggle: /think), where the template has it."),
    n: int = typer.Option(1024, "-n", "--max-tokens", help="Most tokens per reply."),
    chat_template: Optional[Path] = typer.Option(None, "--chat-template", help=_TEMPLATE_HELP),
    preset: Optional[str] = typer.Option(None, "--preset", help=_PRESET_HELP),
    temperature: Optional[float] = typer.Option(None, "--temperature", "--temp", help=_TEMP_HELP),
    seed: Optional[int] = typer.Option(None, "-s", "--seed", help=_SEED_HELP),
    layers: Optional[str] = typer.Option(None, "--layers", help=_LAYERS_HELP),
    history_file: Optional[Path] = typer.Option(
        None, "--history-file", help="Line history (default $XDG_STATE_HOME/lemonslice/chat_history, "
                                     "else ~/.cache/lemonslice/chat_history)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=_MEMORY_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help=_THREADS_HELP),
    exact: bool = typer.Option(False, "--exact", help=_EXACT_HELP),
    cache_type_k: str = typer.Option("f16", "--cache-type-k", "-ctk", help=_CTK_HELP),
    cache_type_v: str = typer.Option("f16", "--cache-type-v", "-ctv", help=_CTV_HELP),
    verify: bool = typer.Option(False, "--verify", help=_VERIFY_HELP),
) -> None:
    """Interactive multi-turn chat with line editing and history; /help lists the commands.
    Ctrl-C stops a reply, Ctrl-D or /exit leaves."""
    from ..engine.sampling import Sampler

    if n < 0:
        raise LemonsliceError(f"-n must be >= 0, got {n}")
    params = _sampling(preset, seed, temperature=temperature)
    engine, tok = _open_engine(model, max_memory, threads, layers, text=True, verify=verify, exact=exact,
                               kv_types=(cache_type_k, cache_type_v))
    from ..text.prompt import chat_template_for, stop_ids

    template = chat_template_for(engine.store.metadata, str(chat_template) if chat_template else None)
    stops = stop_ids(tok, engine.store.metadata)
    lines = _Lines(history_file or default_history_file())
    sampler = Sampler(params)
    if params.temperature > 0:
        err.print(f"seed: {sampler.seed}", highlight=False)
    _repl(_Chat(engine, tok, template, stops, sampler, params, n, system, thinking), lines)
