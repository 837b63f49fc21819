"""The server's chat page (src/lemonslice/server/static/chat.html) in a real headless Chromium.

The first two tests drive the real `serve` app (Qwen3.5's template and vocabulary on a model
whose reply is fixed and streams at a human pace, tests/replay.py): load the page, send a
prompt, see the thinking and the answer stream in, press stop, see the slot freed; and an
error shown. The last one runs the page against a stub defined here that records the
requests, to check what the page sends (settings, history without thinking, the key).

Set LEMONSLICE_UPDATE_SCREENSHOT=1 to rewrite docs/chat-page.png from the first test.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest

import fastapi
import httpx
import uvicorn
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from qwen_vocab import cached_qwen_gguf
from replay import ReplayEngine
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait
from serve_util import serving

from lemonslice.server.service import ModelService

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "src" / "lemonslice" / "server" / "static" / "chat.html"
SCREENSHOT = ROOT / "docs" / "chat-page.png"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT_S = 20  # every wait is bounded; the stub's whole reply takes about 16 s

MODEL = "stub-model"
DELAY_S = 0.05
THINKING = re.findall(r"\S+\s*", "The user asks why lemons are sour. Citric acid is the reason; "
                                  "mention the pH and keep the answer short. ")
ANSWER = re.findall(r"\S+\s*", 5 * (
    "Lemons taste sour because their juice is rich in citric acid, about five to six percent by "
    "weight, which puts its pH near 2. Your tongue's sour receptors respond to the hydrogen ions "
    "that the acid releases, so the more free acid, the sharper the taste. Sugar can mask it, which "
    "is why lemonade needs so much of it.\n\n"))


def _chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> str:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
            "choices": choices, "usage": usage}
    return f"data: {json.dumps(body)}\n\n"


async def _reply(body: dict):
    """Thinking then answer deltas, cut at max_tokens; a prompt about the weather gets a tool call."""
    pieces = [{"reasoning_content": w} for w in THINKING]
    if "weather" in body["messages"][-1]["content"]:
        pieces += [{"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                    "function": {"name": "get_weather", "arguments": ""}}]},
                   {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
                   {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}]
        done = "tool_calls"
    else:
        pieces += [{"content": w} for w in ANSWER]
        done = "stop"
    sent = pieces[: body.get("max_tokens") or len(pieces)]
    yield _chunk({"role": "assistant"})
    for delta in sent:
        await asyncio.sleep(DELAY_S)
        yield _chunk(delta)
    yield _chunk({}, done if len(sent) == len(pieces) else "length")
    prompt = sum(len(m["content"].split()) for m in body["messages"])
    yield _chunk(usage={"prompt_tokens": prompt, "completion_tokens": len(sent), "total_tokens": prompt + len(sent)})
    yield "data: [DONE]\n\n"


def stub_app(requests: list[dict]) -> fastapi.FastAPI:
    app = fastapi.FastAPI()

    @app.get("/")
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "stub"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: fastapi.Request):
        body = await request.json()
        requests.append({"body": body, "authorization": request.headers.get("authorization")})
        temperature = body.get("temperature", 1.0)
        if not 0 <= temperature <= 2:
            error = {"message": f"temperature must be between 0 and 2, got {temperature}",
                     "type": "invalid_request_error", "param": "temperature", "code": None}
            return JSONResponse({"error": error}, status_code=400)
        return StreamingResponse(_reply(body), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def stub_server():
    """(base URL, the requests it received) of the stub, served by uvicorn in a thread."""
    requests: list[dict] = []
    # Binding here and handing uvicorn the socket avoids racing another process for a free port.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(stub_app(requests), log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            pytest.fail("the stub server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", requests
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()
    assert not thread.is_alive(), "the stub server did not stop"


# The real server's reply to the page: Qwen3.5's template and vocabulary on a replayed model
# (thinking, then a long answer), one token per 40 ms so that there is time to press stop.
THOUGHT = "Lemons hold a lot of citric acid, so the answer is about acid."
ANSWER = " ".join(["Lemons taste sour because their juice is rich in citric acid, which lowers its pH."] * 12)


@pytest.fixture(scope="module")
def chat_url(tmp_path_factory):
    """Base URL of `lemonslice serve`'s app, with the page at `/` and the OpenAI API under `/v1`."""
    vocab = cached_qwen_gguf(tmp_path_factory, chat=True)
    engine = ReplayEngine(str(vocab), {"default": f"{THOUGHT}\n</think>\n\n{ANSWER}"}, delay_s=0.04)
    with serving(lambda: ModelService(engine, engine.tok, model_id="qwen35-replay")) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    assert os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), \
        f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian: apt install chromium chromium-driver; `make test` installs them)"
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,760"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


def open_page(driver, base_url: str):
    """Load the page fresh (no stored API key) and wait until it has listed the model."""
    driver.get(base_url + "/")
    driver.execute_script("localStorage.clear()")
    driver.refresh()
    until(driver, lambda d: d.find_element(By.ID, "model").text not in ("", "no model"), "the model id")
    return driver


def until(driver, condition, what: str, timeout: float = WAIT_S):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, f"timed out waiting for {what}")


def status(driver) -> str:
    return driver.find_element(By.ID, "status").text


def text_of(driver, css: str) -> str:
    """textContent, so that text inside a folded <details> counts too."""
    return driver.execute_script(
        "const e = document.querySelectorAll(arguments[0]); return e.length ? e[e.length - 1].textContent : ''", css)


def type_into(driver, element_id: str, value: str) -> None:
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(value)


def test_stream_thinking_and_stop(browser, chat_url):
    """An answer streams in, its thinking goes to the thinking panel only, and Stop ends it with
    the text kept."""
    driver = open_page(browser, chat_url)
    Select(driver.find_element(By.ID, "preset")).select_by_value("thinking")
    assert driver.find_element(By.ID, "enable-thinking").is_selected()
    assert status(driver) == "idle"
    type_into(driver, "prompt", "Why are lemons sour?")
    driver.find_element(By.ID, "send").click()

    until(driver, lambda d: status(d) == "generating", "status 'generating'")
    first = until(driver, lambda d: text_of(d, ".assistant .answer"), "answer text")
    until(driver, lambda d: len(text_of(d, ".assistant .answer")) > len(first) + 200, "the answer to grow")

    thinking = text_of(driver, ".assistant .thinking .thinking-text").strip()
    answer = text_of(driver, ".assistant .answer")
    assert thinking, "no thinking in the thinking panel"
    assert thinking[:30] not in answer
    assert not driver.find_element(By.ID, "stop").get_attribute("disabled")

    # The panel folds itself once the answer starts; a click opens it again.
    driver.find_element(By.CSS_SELECTOR, ".assistant .thinking summary").click()
    until(driver, lambda d: d.find_element(By.CSS_SELECTOR, ".assistant .thinking-text").is_displayed(),
          "the thinking panel to open")
    if os.environ.get("LEMONSLICE_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(SCREENSHOT))

    driver.find_element(By.ID, "stop").click()
    until(driver, lambda d: status(d) == "idle", "status 'idle' after stop", timeout=10)
    stopped = text_of(driver, ".assistant .answer")
    time.sleep(10 * DELAY_S)
    assert text_of(driver, ".assistant .answer") == stopped, "the answer kept growing after stop"
    assert stopped.startswith(first) and len(stopped) > len(first)
    assert "stopped" in text_of(driver, ".assistant .stats")
    assert driver.find_element(By.ID, "error").text == ""
    assert not driver.find_element(By.ID, "send").get_attribute("disabled")
    assert thinking == THOUGHT and ANSWER.startswith(stopped)
    # The aborted stream freed its slot on the server.
    until(driver, lambda d: httpx.get(chat_url + "/health", timeout=5).json()["slots_busy"] == 0,
          "the server to free the slot", timeout=10)


def test_error_response_is_shown(browser, chat_url):
    """A 4xx with an OpenAI error body shows in #error, and the prompt comes back for a retry."""
    driver = open_page(browser, chat_url)
    type_into(driver, "temperature", "-1")
    assert Select(driver.find_element(By.ID, "preset")).first_selected_option.text == "custom"
    type_into(driver, "prompt", "Why are lemons sour?")
    driver.find_element(By.ID, "prompt").send_keys(Keys.ENTER)

    error = until(driver, lambda d: d.find_element(By.ID, "error").text, "an error line")
    assert "temperature" in error.lower() and "400" in error
    assert status(driver) == "idle"
    assert not driver.find_elements(By.CSS_SELECTOR, "#messages .assistant")
    assert driver.find_element(By.ID, "prompt").get_attribute("value") == "Why are lemons sour?"


def test_history_settings_tool_calls_and_clear(browser, stub_server):
    """What the stub receives: sampling fields, the API key, earlier answers without their thinking;
    a cut-off reply's usage line, a tool call's block, Shift+Enter and Clear."""
    base, requests = stub_server
    driver = open_page(browser, base)
    Select(driver.find_element(By.ID, "preset")).select_by_value("thinking")
    max_tokens = len(THINKING) + 6
    type_into(driver, "max-tokens", str(max_tokens))
    type_into(driver, "api-key", "sk-test")

    def ask(text: str | None) -> dict:
        """Send `text`, or what the prompt holds if None; the stub's record of the request."""
        before = len(requests)
        if text is not None:
            type_into(driver, "prompt", text)
        driver.find_element(By.ID, "send").click()
        until(driver, lambda d: len(requests) > before and status(d) == "idle"
              and not d.find_elements(By.CSS_SELECTOR, ".assistant.streaming"), f"the reply to {text!r}")
        return requests[-1]

    first = ask("Why are lemons sour?")
    body = first["body"]
    assert first["authorization"] == "Bearer sk-test"
    assert body["model"] == MODEL and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["temperature"], body["top_p"], body["top_k"], body["min_p"]) == (0.6, 0.95, 20, 0)
    assert body["max_tokens"] == max_tokens and body["chat_template_kwargs"] == {"enable_thinking": True}
    stats = text_of(driver, ".assistant .stats")
    assert f"{max_tokens} completion tokens" in stats and "tokens/s" in stats and "finish: length" in stats
    first_answer = text_of(driver, ".assistant .answer")
    assert first_answer == "".join(ANSWER[:6])

    sent = len(requests)
    prompt = driver.find_element(By.ID, "prompt")
    prompt.send_keys("What about the weather?", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "In Paris.")
    assert prompt.get_attribute("value") == "What about the weather?\nIn Paris."
    assert len(requests) == sent, "Shift+Enter sent the prompt"
    second = ask(None)["body"]["messages"]
    assert second == [
        {"role": "user", "content": "Why are lemons sour?"},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "What about the weather?\nIn Paris."},
    ]
    assert text_of(driver, ".assistant .tool-calls").startswith('get_weather({"city": "Paris"})')

    driver.find_element(By.ID, "clear").click()
    assert not driver.find_elements(By.CSS_SELECTOR, "#messages > *")
    assert [m["role"] for m in ask("Hello again")["body"]["messages"]] == ["user"]

    driver.refresh()
    until(driver, lambda d: d.find_element(By.ID, "api-key").get_attribute("value") == "sk-test", "the stored key")
    driver.execute_script("localStorage.clear()")


def test_page_with_a_key_in_its_address_talks_to_a_keyed_server(browser, tmp_path_factory):
    """`serve --api-key` serves the page at /?key=KEY; the page keeps the key and uses it."""
    vocab = cached_qwen_gguf(tmp_path_factory, chat=True)
    engine = ReplayEngine(str(vocab), {"default": "Keyed hello."})
    with serving(lambda: ModelService(engine, engine.tok, model_id="keyed"), api_key="k3y") as url:
        browser.get(url + "/?key=k3y")
        until(browser, lambda d: d.find_element(By.ID, "model").text == "keyed",
              f"the model id with the key ({browser.find_element(By.ID, 'model').text!r}, "
              f"{browser.find_element(By.ID, 'error').text!r})")
        assert "key=" not in browser.current_url
        Select(browser.find_element(By.ID, "preset")).select_by_value("greedy")
        type_into(browser, "prompt", "hello")
        browser.find_element(By.ID, "send").click()
        until(browser, lambda d: text_of(d, ".assistant .answer") == "Keyed hello." and status(d) == "idle",
              "the answer")
        browser.execute_script("localStorage.clear()")
