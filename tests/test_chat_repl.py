"""`lemonslice chat` at a terminal, driven through a pseudo-terminal with pexpect: line editing,
the history file (recalled in a later session), Ctrl-C during a reply, the slash commands, and
the thinking indicator only where the chat template has a thinking mode.

What the model received is read back with /save and checked against greedy decoding from a fresh
engine state on that conversation, so an interrupted reply must leave the state as if it had
ended there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import pexpect
import pytest

from lemonslice.engine import Engine
from lemonslice.engine.generation import Session
from lemonslice.engine.sampling import Sampler, SamplingParams
from lemonslice.testing import tiny_qwen35, write_synthetic
from lemonslice.text.prompt import chat_template_for, encode_prompt, special_kwargs, stop_ids
from lemonslice.text.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))
UP, LEFT, BACKSPACE, CTRL_C = "\x1b[A", "\x1b[D", "\x7f", "\x03"
# prompt_toolkit turns bracketed paste on as a prompt starts (its raw mode is on by then) and off
# once a line is accepted: the output between them is the line being edited.
PROMPT_ON, PROMPT_OFF = "\x1b[?2004h", "\x1b[?2004l"
STATS = r"\((interrupted; )?(\d+) tokens, [\d.]+ tokens/s, (\d+) prompt tokens re-used\)"
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\x08")


def _plain(text: str) -> str:
    return _ESCAPES.sub("", text)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


class Repl:
    """One `lemonslice chat` in a pseudo-terminal."""

    def __init__(self, model: Path, history: Path, *args: str):
        env = os.environ | {"TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
        self.child = pexpect.spawn(
            # -ctk/-ctv f32: the in-process replies compared with run with the library's f32 cache
            LEMONSLICE, ["chat", str(model), "--threads", "1", "--history-file", str(history), "-ctk", "f32", "-ctv",
                         "f32", *args],
            env=env, encoding="utf-8", timeout=60, dimensions=(24, 400))
        self.banner = self.wait_prompt()

    def wait_prompt(self) -> str:
        """The output since the last accepted line, plain; self.prompt is the prompt shown."""
        self.child.expect_exact(PROMPT_ON)
        before = self.child.before
        self.child.expect(r"(\[thinking \w+\] )?>")
        self.prompt = self.child.match.group(0)
        return _plain(before.rpartition(PROMPT_OFF)[2])

    def command(self, line: str) -> str:
        self.child.sendline(line)
        return self.wait_prompt()

    def reply(self, keys: str, interrupt: bool = False) -> tuple[str, int, bool]:
        """Type `keys` (ending with Enter): (the reply shown, its token count, whether it was interrupted)."""
        self.child.send(keys)
        begun = ""
        if interrupt:
            self.child.expect_exact(PROMPT_OFF)
            self.child.expect(r"\w+ \w")  # two words of the reply are out
            begun = self.child.before + self.child.match.group(0)
            self.child.send(CTRL_C)
        self.child.expect(STATS)
        # The terminal echoes Ctrl-C as ^C.
        shown = _plain((begun + self.child.before).rpartition(PROMPT_OFF)[2]).replace("^C", "")
        stopped, count = bool(self.child.match.group(1)), int(self.child.match.group(2))
        self.reused = int(self.child.match.group(3))
        self.wait_prompt()
        return shown, count, stopped

    def save(self, path: Path) -> list[dict]:
        assert "saved" in self.command(f"/save {path}")
        return json.loads(path.read_text(encoding="utf-8"))

    def leave(self, keys: str) -> int:
        self.child.send(keys)
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus


@pytest.fixture(scope="module")
def gemma_reply(gemma_path):
    """Greedy reply text to a conversation, from a fresh engine state each time."""
    engine = Engine(gemma_path)
    tok = Tokenizer.from_gguf(engine.store.metadata)
    template, stops = chat_template_for(engine.store.metadata), stop_ids(tok, engine.store.metadata)

    def reply(messages: list[dict], n: int) -> str:
        text = template.render(messages, add_generation_prompt=True, **special_kwargs(tok))
        ids = encode_prompt(tok, text, templated=True)
        return tok.decode(Session(engine).generate(ids, Sampler(SamplingParams(temperature=0.0)), n, stops),
                          skip_special=True)

    return reply


@pytest.fixture(scope="module")
def first_session(gemma_path, tmp_path_factory) -> dict:
    """A first chat on Gemma 3 (no thinking mode), 6 tokens a reply: the commands, an edited line,
    a recalled line, Ctrl-C at the prompt; it leaves a history file for the next session."""
    tmp = tmp_path_factory.mktemp("chat1")
    r, got = Repl(gemma_path, tmp / "history", "-n", "6"), {"history": tmp / "history"}
    got["banner"], got["prompt"] = r.banner, r.prompt
    for cmd in ("/help", "/xyz", "/think"):
        got[cmd] = r.command(cmd)
    # "Name a colxr." -> two left, one backspace, type "ou" -> "Name a colour."
    got["edited"] = r.reply("Name a colxr." + LEFT * 2 + BACKSPACE + "ou\r")
    got["recalled"] = r.reply(UP + "\r")
    got["saved"] = r.save(tmp / "one.json")
    got["/reset"], got["after reset"] = r.command("/reset"), r.command("/history")
    r.child.send("never sent" + CTRL_C)
    r.wait_prompt()
    got["after ctrl-c"] = r.command("/history")
    got["last"] = r.reply("Tell me about dragons.\r")
    got["exit"] = r.leave("\x04")  # Ctrl-D
    return got


def test_commands_are_not_sent_to_the_model(first_session):
    s = first_session
    assert s["prompt"] == ">" and "thinking" not in s["banner"]
    assert all(c in s["/help"] for c in ("/help", "/reset", "/history", "/save", "/exit")), s["/help"]
    assert "/think" not in s["/help"]
    assert "unknown command /xyz" in s["/xyz"]
    assert "this model's chat template has no thinking mode" in s["/think"]
    assert not any(re.search(STATS, s[c]) for c in ("/help", "/xyz", "/think"))  # no reply to any of them
    assert "conversation cleared" in s["/reset"] and "(no messages)" in s["after reset"]
    assert s["exit"] == 0


def test_edited_and_recalled_lines_reach_the_model(first_session, gemma_reply):
    s = first_session
    line = "Name a colour."
    want = gemma_reply([_user(line)], 6)
    assert want != gemma_reply([_user("Name a colxr.")], 6)  # the edit shows in the reply
    assert s["edited"] == (want + "\n", 6, False)
    again = gemma_reply([_user(line), _assistant(want), _user(line)], 6)
    assert s["recalled"] == (again + "\n", 6, False)
    assert s["saved"] == [_user(line), _assistant(want), _user(line), _assistant(again)]
    # Ctrl-C at the prompt dropped the line: not sent, not in the history file.
    assert "(no messages)" in s["after ctrl-c"]
    history = s["history"].read_text(encoding="utf-8")
    assert f"+{line}\n" in history and "never sent" not in history


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(first_session, gemma_path, gemma_reply, tmp_path):
    """A later session recalls the first one's last line; Ctrl-C stops each reply of up to 1000
    tokens early, and the next turn is what a fresh state gives for the conversation so far."""
    r = Repl(gemma_path, first_session["history"], "-n", "1000")
    first, n1, stopped1 = r.reply(UP + "\r", interrupt=True)
    second, n2, stopped2 = r.reply("Name a colour.\r", interrupt=True)
    reused = r.reused  # the state the interrupted turn left was built upon, not thrown away
    saved = r.save(tmp_path / "two.json")
    assert r.leave("/exit\r") == 0
    assert stopped1 and stopped2 and 0 < n1 < 1000 and 0 < n2 < 1000 and reused > 0
    u1, u2 = _user("Tell me about dragons."), _user("Name a colour.")
    assert saved == [u1, _assistant(first[:-1]), u2, _assistant(second[:-1])]
    assert first[:-1] == gemma_reply([u1], n1)
    assert second[:-1] == gemma_reply([u1, _assistant(first[:-1]), u2], n2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "tiny.gguf"
    write_synthetic(path, tiny_qwen35())
    return path


def test_thinking_indicator_where_the_template_has_thinking(tiny, tmp_path):
    """The synthetic Qwen3.5 gets the built-in ChatML template, whose enable_thinking switch works."""
    r = Repl(tiny, tmp_path / "history", "-n", "2")
    assert r.prompt == "[thinking on] >" and "/think toggles thinking" in r.banner
    assert "/think" in r.command("/help")
    assert "thinking off" in r.command("/think") and r.prompt == "[thinking off] >"
    assert r.leave("/quit\r") == 0


def test_a_second_ctrl_c_inside_a_forward_pass_abandons_the_turn(tiny, monkeypatch, capsys):
    """Two Ctrl-C while the model computes a token: the turn is dropped, the state rebuilt, and
    the next turn is what a fresh state gives for the conversation without it."""
    from lemonslice.cli.chat import _Chat

    engine = Engine(tiny)
    tok = Tokenizer.from_gguf(engine.store.metadata)
    template, stops = chat_template_for(engine.store.metadata), stop_ids(tok, engine.store.metadata)
    params = SamplingParams(temperature=0.0)
    chat = _Chat(engine, tok, template, stops, Sampler(params), params, 4, None, False)

    def turn(line: str) -> None:  # as the REPL runs each line
        with chat.ctrl_c.installed():
            chat.turn(line)

    turn("hello")
    kept, forward = list(chat.messages), engine.forward

    def ctrl_c_twice(ids, *args, **kwargs):  # noqa: ANN001, ANN202
        out = forward(ids, *args, **kwargs)  # the state has moved when the signals land
        if len(ids) == 1:
            chat.ctrl_c(signal.SIGINT, None)
            chat.ctrl_c(signal.SIGINT, None)
        return out

    monkeypatch.setattr(engine, "forward", ctrl_c_twice)
    turn("lost")
    assert chat.messages == kept and chat.session.fed == []
    assert "reply abandoned" in capsys.readouterr().err
    monkeypatch.setattr(engine, "forward", forward)
    turn("again")
    text = template.render(kept + [_user("again")], add_generation_prompt=True, enable_thinking=False,
                           **special_kwargs(tok))
    fresh = Session(Engine(tiny)).generate(encode_prompt(tok, text, templated=True), Sampler(params), 4, stops)
    assert capsys.readouterr().out == tok.decode(fresh, skip_special=True) + "\n"


def test_default_history_file(monkeypatch, tmp_path):
    from lemonslice.cli.chat import default_history_file

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_history_file() == tmp_path / "state" / "lemonslice" / "chat_history"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_history_file() == tmp_path / ".cache" / "lemonslice" / "chat_history"
