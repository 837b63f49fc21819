"""`serve` on tiny Qwen3.5 models with Qwen3.5's own chat template: the prompt cache across
turns of a long chat, and slots that decode together."""

from __future__ import annotations

import random
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from qwen_vocab import TEMPLATE
from serve_util import serving

from lemonslice.engine import Engine, runtime
from lemonslice.server.service import ModelService
from lemonslice.testing.config import tiny_qwen35, tiny_qwen35moe
from lemonslice.testing.synthetic import write_synthetic
from lemonslice.text.chat import load_template
from lemonslice.text.tokenizer import Tokenizer

WORDS = "lemon slice layer model stream expert cache token prompt reply think tool disk memory".split()
MODELS = {"qwen35moe": tiny_qwen35moe, "qwen35": tiny_qwen35}


@pytest.fixture(scope="module", params=sorted(MODELS))
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / f"{request.param}.gguf"
    write_synthetic(path, MODELS[request.param]())
    runtime.setup(kv_types=("f16", "f16"))
    yield path
    runtime.setup(kv_types=("f32", "f32"))


def _load(path, parallel: int = 1):  # noqa: ANN001, ANN202
    template = load_template(TEMPLATE)
    return lambda: ModelService(Engine(path), Tokenizer.from_gguf(path), template=template, parallel=parallel)


def _chat(url: str, messages: list[dict], max_tokens: int = 24) -> dict:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
        "messages": messages, "temperature": 0, "max_tokens": max_tokens,
        "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200, r.text
    return r.json()


def _metric(url: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", httpx.get(f"{url}/metrics", timeout=30).text, re.M)
    assert m, name
    return float(m.group(1))


def _prefix_tokens(path, messages: list[dict]) -> int:  # noqa: ANN001
    """Tokens of the conversation up to its last message, as the template renders it without a
    generation prompt: what a new turn shares with the state the last one left."""
    tok = Tokenizer.from_gguf(path)
    text = load_template(TEMPLATE).render(messages, add_generation_prompt=False, enable_thinking=False)
    return len(tok.encode(text, add_special=False))


def test_later_turns_prefill_only_what_is_new_and_equal_a_fresh_server(tiny):
    rng = random.Random(7)
    messages = [{"role": "system", "content": "You answer in a few words."}]
    with serving(_load(tiny)) as url:
        for turn in range(5):
            messages.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(110))})
            before = _metric(url, "lemonslice_prefill_tokens_total")
            r = _chat(url, messages)
            usage, reply = r["usage"], r["choices"][0]["message"]["content"]
            prefilled = _metric(url, "lemonslice_prefill_tokens_total") - before
            assert prefilled == usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
            if turn in (1, 4):
                # The state up to the previous user turn is re-used: only the re-rendered reply,
                # the new user turn and the generation prompt are fed.
                assert usage["prompt_tokens_details"]["cached_tokens"] == _prefix_tokens(tiny, messages[:-2])
                with serving(_load(tiny)) as fresh:
                    again = _chat(fresh, messages)
                assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
                assert again["choices"][0]["message"]["content"] == reply
            messages.append({"role": "assistant", "content": reply})
        assert usage["prompt_tokens"] > 2000


def test_four_slots_decode_together_and_each_gives_what_it_gives_alone(tiny):
    rng = random.Random(3)
    convs = [[{"role": "user", "content": f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(20 + 15 * i))}]
             for i in range(4)]
    with serving(_load(tiny, parallel=4)) as url:
        alone = [_chat(url, c, 40)["choices"][0]["message"]["content"] for c in convs]
        steps0, rows0 = _metric(url, "lemonslice_batched_steps"), _metric(url, "lemonslice_batched_sequences")
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda c: _chat(url, c, 40)["choices"][0]["message"]["content"], convs))
        steps = _metric(url, "lemonslice_batched_steps") - steps0
        rows = _metric(url, "lemonslice_batched_sequences") - rows0
    assert together == alone
    assert rows / steps > 2.0, (rows, steps)  # most steps carried several sequences


def test_openai_client_greedy_equals_lemonslice_run(tiny):
    """The official client, streamed and not, on a tiny Qwen3.5 with Qwen3.5's own template:
    the reply is `lemonslice run --chat`'s for the same prompt."""
    import subprocess
    import sys
    from pathlib import Path

    from openai import OpenAI

    prompt = "Tell me about lemons and layers."
    cli = subprocess.run([str(Path(sys.executable).with_name("lemonslice")), "run", str(tiny), "--chat", "--no-thinking",
                          "--chat-template", str(TEMPLATE), "-p", prompt, "-n", "20", "--temp", "0"],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    want = cli.stdout[:-1]
    with serving(_load(tiny)) as url:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        args = dict(model="tiny", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=20,
                    extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        whole = client.chat.completions.create(**args)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **args)
                           if c.choices)
    assert whole.choices[0].message.content == want == streamed
