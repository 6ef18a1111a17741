"""The OpenAI-compatible server, driven by the official `openai` client over HTTP on 127.0.0.1.

One server subprocess (`python -m offload_runtime.serve` on the demo pair, float64 so a row's arithmetic does
not depend on its batch) serves most tests; an engine in this process gives what each request yields alone.
A few tests run the app in-process on the tiny pair, where they need to reach into the engine.
"""
from __future__ import annotations

import json
import logging
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import httpx
import openai
import pytest
import uvicorn

from helpers import load_tool
from offload_runtime import Engine
from offload_runtime.errors import UsageError
from offload_runtime.serve.__main__ import bind, exposure_warning, main as serve_main
from offload_runtime.serve.app import ServeSettings, create_app
from offload_runtime.serve.launch import ServerProcess, launched
from offload_runtime.serve.protocol import ApiError, parse_request

KEY = "test-key-7f3a"
ENV = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
MAX_BODY = 65536


def wait_for(server: ServerProcess, condition, what: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = server.health()
        if condition(h):
            return h
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s: {server.health()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    args = ["--model", "demo", "--device", "cpu", "--dtype", "float64", "--plan", "none", "--api-key", KEY,
            "--batch-size", "8", "--max-queue", "2", "--max-request-bytes", str(MAX_BODY)]
    with launched(args, tmp_path_factory.mktemp("serve") / "serve.log", env=ENV) as s:
        yield s


@pytest.fixture(scope="module")
def engine() -> Engine:
    """The server's model in this process: what a request gives alone."""
    return Engine.from_pretrained("demo", device="cpu", dtype="float64", plan=None, quiet=True)


def client(server: ServerProcess, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def ask(i: int) -> list[dict[str, str]]:
    topics = ["the ark", "the river", "the king", "the tabernacle", "the wilderness", "the harvest", "the temple",
              "the mountain"]
    return [{"role": "user", "content": f"Tell me of {topics[i % len(topics)]}."}]


FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


# --- replies


def test_a_greedy_chat_reply_is_engine_chat(server, engine):
    messages = [{"role": "system", "content": "Answer in the words of the book."},
                {"role": "user", "content": "Who made the heaven and the earth?"}]
    r = client(server).chat.completions.create(model="demo", messages=messages, max_tokens=24, temperature=0)
    alone = engine.chat(messages, max_new_tokens=24, temperature=0)
    assert r.choices[0].message.content == alone.text and alone.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == FINISH[alone.finish_reason]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(alone.prompt_token_ids), len(alone.token_ids))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.model == "demo" and r.id.startswith("chatcmpl-")


def test_a_streamed_chat_reply_arrives_in_pieces_and_equals_the_whole(server, engine):
    messages = ask(0)
    chunks = list(client(server).chat.completions.create(
        model="demo", messages=messages, max_tokens=40, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    alone = engine.chat(messages, max_new_tokens=40, temperature=0)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == alone.text
    assert len(pieces) > 2  # it really streamed, step by step
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [FINISH[alone.finish_reason]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(alone.token_ids)
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_completions_with_a_stop_string_whole_and_streamed(server, engine):
    prompt = "And God said"
    free = engine.generate(prompt, max_new_tokens=40, temperature=0, ignore_eos=True)[0].text
    stop = free.split()[3]  # a word the greedy reply reaches
    alone = engine.generate(prompt, max_new_tokens=40, temperature=0, ignore_eos=True, stop=stop)[0]
    assert alone.finish_reason == "stop" and alone.text == free[: free.find(stop)]
    c = client(server)
    whole = c.completions.create(model="demo", prompt=prompt, max_tokens=40, temperature=0, stop=[stop],
                                 extra_body={"ignore_eos": True})
    assert whole.choices[0].text == alone.text and whole.choices[0].finish_reason == "stop"
    assert whole.object == "text_completion"
    chunks = list(c.completions.create(model="demo", prompt=prompt, max_tokens=40, temperature=0, stop=stop,
                                       stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == alone.text
    assert chunks[-1].choices[0].finish_reason == "stop"
    ids = c.completions.create(model="demo", prompt=alone.prompt_token_ids, max_tokens=40, temperature=0,
                               stop=[stop], extra_body={"ignore_eos": True})
    assert ids.choices[0].text == alone.text  # a prompt of token ids is the same prompt


# --- concurrency


def test_eight_concurrent_streaming_clients_share_sweeps_and_each_gets_its_reply_alone(server, engine):
    n, tokens = 8, 32
    settings = [dict(temperature=0) if i % 2 == 0 else dict(temperature=0.8, top_p=0.95, seed=100 + i)
                for i in range(n)]
    start = threading.Barrier(n)

    def one(i: int) -> tuple[str, int]:
        c = client(server)
        start.wait(timeout=30)
        stream = c.chat.completions.create(model="demo", messages=ask(i), max_tokens=tokens, stream=True,
                                           stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}, **settings[i])
        text, usage = "", None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            usage = chunk.usage or usage
        return text, usage.completion_tokens

    before = server.health()
    with ThreadPoolExecutor(n) as pool:
        got = list(pool.map(one, range(n), timeout=300))
    after = server.health()
    alone = [engine.chat(ask(i), max_new_tokens=tokens, ignore_eos=True, **settings[i]) for i in range(n)]
    assert [t for t, _ in got] == [a.text for a in alone]
    assert [k for _, k in got] == [tokens] * n
    sweeps = after["sweeps"] - before["sweeps"]
    sweeps_alone = sum(a.stats.steps + a.stats.prefill_sweeps for a in alone)
    assert sweeps < n * tokens  # speculation: several tokens per sweep
    assert sweeps < sweeps_alone / 2  # sharing: the rows verified their trees in the same sweeps
    assert after["requests"]["finished"] - before["requests"]["finished"] == n
    assert after["running"] == 0 and after["waiting"] == 0


def _open_stream(http: httpx.Client, server: ServerProcess, i: int) -> httpx.Response:
    """A long streamed request whose response has begun (so it was admitted)."""
    body = {"model": "demo", "messages": ask(i), "max_tokens": 1000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    request = http.build_request("POST", f"{server.url}/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {KEY}"})
    response = http.send(request, stream=True)
    assert response.status_code == 200, response.read()
    return response


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    before = server.health()
    with httpx.Client(timeout=60) as http:
        response = _open_stream(http, server, 3)
        lines = response.iter_lines()
        content = []
        for line in lines:
            if '"content": "' in line and '"content": ""' not in line:
                content.append(line)
                if len(content) == 2:
                    break
        request_id = re.search(r'"id": "(chatcmpl-\w+)"', content[0]).group(1)
        response.close()
    h = wait_for(server, lambda h: h["running"] == 0 and h["requests"]["cancelled"] > before["requests"]["cancelled"],
                    "the row freed")
    assert h["waiting"] == 0
    line = next(l for l in server.log_text().splitlines() if request_id in l and "tokens/s" in l)
    assert " cancelled " in line
    generated = int(re.search(r"\+ (\d+) new tokens", line).group(1))
    assert 0 < generated < 1000
    r = client(server).chat.completions.create(model="demo", messages=ask(1), max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4  # and the server goes on serving


def test_beyond_the_queue_requests_get_429_with_retry_after(server):
    before = server.health()
    capacity = before["batch_size"] + before["max_queue"]
    with httpx.Client(timeout=60) as http:
        streams = [_open_stream(http, server, i) for i in range(capacity)]
        try:
            wait_for(server, lambda h: h["running"] == before["batch_size"] and h["waiting"] == before["max_queue"],
                        "a full batch and a full queue")
            with pytest.raises(openai.RateLimitError) as e:
                client(server).chat.completions.create(model="demo", messages=ask(0), max_tokens=4)
            assert int(e.value.response.headers["Retry-After"]) >= 1
            assert "busy" in e.value.message
        finally:
            for s in streams:
                s.close()
    h = wait_for(server, lambda h: h["running"] == 0 and h["waiting"] == 0, "every row and queue place freed")
    assert h["requests"]["rejected"] == before["requests"]["rejected"] + 1
    assert h["requests"]["cancelled"] == before["requests"]["cancelled"] + capacity


# --- bad requests


def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(server):
    c = client(server)
    chat = c.chat.completions.create

    def refused(error_type, call, needle: str, param: str | None = None) -> None:
        with pytest.raises(error_type) as e:
            call()
        assert needle in e.value.message, e.value.message
        if param is not None:
            assert e.value.param == param

    refused(openai.BadRequestError, lambda: chat(model="demo", messages=[]), "messages", "messages")
    refused(openai.BadRequestError, lambda: chat(model="demo", messages=ask(0), temperature=-1), "temperature",
            "temperature")
    refused(openai.BadRequestError, lambda: chat(model="demo", messages=ask(0), top_p=0), "top_p", "top_p")
    refused(openai.BadRequestError, lambda: chat(model="demo", messages=ask(0), max_tokens=0), "max_tokens",
            "max_tokens")
    long = [{"role": "user", "content": "and the " * 700}]
    refused(openai.BadRequestError, lambda: chat(model="demo", messages=long), "context window holds 1024",
            "messages")
    refused(openai.BadRequestError, lambda: chat(model="demo", messages=ask(0), n=2), "n=2", "n")
    refused(openai.BadRequestError, lambda: chat(model="demo", messages=ask(0), logprobs=True), "logprobs",
            "logprobs")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    refused(openai.BadRequestError, lambda: chat(model="demo", messages=ask(0), tools=[tool]), "tool", "tools")
    refused(openai.BadRequestError, lambda: chat(model="demo", messages=ask(0), extra_body={"mirostat": 2}),
            "mirostat", "mirostat")
    refused(openai.BadRequestError, lambda: chat(model="demo", messages=[{"role": "tool", "content": "x"}]),
            "role", "messages[0].role")
    refused(openai.BadRequestError,
            lambda: c.completions.create(model="demo", prompt=["In the beginning", "And God said"]),
            "one prompt per request", "prompt")
    refused(openai.NotFoundError, lambda: chat(model="gpt-4o", messages=ask(0)), "this server serves 'demo'",
            "model")
    refused(openai.AuthenticationError, lambda: client(server, key="wrong").models.list(), "wrong API key")
    # neutral values of parameters the server does not implement are fine
    ok = chat(model="demo", messages=ask(0), max_tokens=3, temperature=0, n=1, logprobs=False,
              frequency_penalty=0.0, presence_penalty=0, user="someone")
    assert ok.usage.completion_tokens == 3

    auth = {"Authorization": f"Bearer {KEY}"}
    url = f"{server.url}/v1/chat/completions"
    no_key = httpx.post(url, json={"messages": ask(0)}, timeout=30)
    assert no_key.status_code == 401 and "no API key" in no_key.json()["error"]["message"]
    huge = httpx.post(url, json={"messages": [{"role": "user", "content": "x" * MAX_BODY}]}, headers=auth, timeout=30)
    assert huge.status_code == 413 and str(MAX_BODY) in huge.json()["error"]["message"]
    broken = httpx.post(url, content=b'{"messages": [', headers={**auth, "Content-Type": "application/json"},
                        timeout=30)
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    missing = httpx.post(url, json={"model": "demo"}, headers=auth, timeout=30)
    assert missing.status_code == 400 and "messages is required" in missing.json()["error"]["message"]
    nowhere = httpx.get(f"{server.url}/v1/nowhere", headers=auth, timeout=30)
    assert nowhere.status_code == 404 and nowhere.json()["error"]["message"]

    r = chat(model="demo", messages=ask(2), max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5 and server.health()["status"] == "ok"
    assert "Traceback" not in server.log_text()


def test_health_and_models(server):
    h = httpx.get(f"{server.url}/health", timeout=10)  # no key needed
    assert h.status_code == 200
    body = h.json()
    assert body["status"] == "ok" and body["model"] == "demo" and body["speculative"] is True
    assert body["batch_size"] == 8 and body["max_queue"] == 2
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["demo"]
    assert c.models.retrieve("demo").id == "demo"
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401


def test_a_stats_line_per_request_and_no_prompt_in_the_log(server):
    marker = "Jehoshaphat"
    r = client(server).chat.completions.create(model="demo", messages=[{"role": "user", "content": marker}],
                                               max_tokens=6, temperature=0)
    deadline = time.monotonic() + 10
    while r.id not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(l for l in server.log_text().splitlines() if r.id in l)
    assert re.search(r"finished \(length\): \d+ prompt \+ 6 new tokens in [\d.]+ s, [\d.]+ tokens/s, "
                     r"[\d.]+ tokens/step over \d+ steps", line), line
    assert marker not in server.log_text()


def test_request_checks_name_the_field_and_accept_neutral_values():
    msgs = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Ok."}]},
            {"role": "user", "content": "Hi"}]
    spec = parse_request({"messages": msgs, "frequency_penalty": 0.0, "n": 1, "max_completion_tokens": 9,
                          "max_tokens": 9, "stop": "x", "stream": True, "stream_options": {"include_usage": True}},
                         "chat", "m")
    assert spec.messages[0] == {"role": "system", "content": "Be brief.\nOk."}
    assert (spec.max_tokens, spec.stop, spec.stream, spec.include_usage) == (9, ("x",), True, True)
    for body, param in [({"n": True}, "n"), ({"presence_penalty": 0.5}, "presence_penalty"),
                        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
                        ({"stream_options": {"include_usage": True}}, "stream_options"),
                        ({"stream": "yes"}, "stream"), ({"seed": -1}, "seed"), ({"stop": [3]}, "stop"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
                        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls")]:
        with pytest.raises(ApiError) as e:
            parse_request({"messages": msgs, **body}, "chat", "m")
        assert e.value.status == 400 and e.value.param == param, (body, e.value.message)
    assert parse_request({"prompt": [[5, 6]]}, "text", "m").prompt == [5, 6]
    with pytest.raises(ApiError, match="unrecognized"):
        parse_request({"prompt": "a", "max_completion_tokens": 3}, "text", "m")  # a chat field


# --- in-process: the app over an engine this test can reach into


@contextmanager
def serve_in_process(engine: Engine, **settings) -> Iterator[str]:
    """uvicorn in a thread on 127.0.0.1 and a free port; always stopped when the block ends."""
    app = create_app(engine, ServeSettings("tiny", **settings))
    sock = bind("127.0.0.1", 0)
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not uv.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert not thread.is_alive()


@pytest.fixture
def tiny_engine(tiny_pair) -> Engine:
    target, draft = tiny_pair
    return Engine.from_pretrained(target, draft=str(draft), dtype="float32", batch_size=2, quiet=True)


def _chat(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "the cat sat"}],
                                                          "temperature": 0, **body}, timeout=60)


def test_the_event_loop_answers_while_a_step_runs(tiny_engine):
    step = tiny_engine.scheduler.decoder.step
    in_step = threading.Event()

    def slow_step(rows):
        in_step.set()
        time.sleep(1.0)  # a long sweep (an offloaded 70B takes seconds)
        step(rows)
    tiny_engine.scheduler.decoder.step = slow_step
    with serve_in_process(tiny_engine) as url:
        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(_chat, url, max_tokens=3, ignore_eos=True)
            assert in_step.wait(timeout=30)
            t0 = time.perf_counter()
            h = httpx.get(f"{url}/health", timeout=10)
            answered = time.perf_counter() - t0
            assert h.status_code == 200 and answered < 0.5, answered
            assert not reply.done()  # the step was still running
            assert reply.result(timeout=60).status_code == 200


def test_a_failing_step_fails_its_requests_and_the_next_one_is_served(tiny_engine, caplog):
    step = tiny_engine.scheduler.decoder.step
    failures = [RuntimeError("out of memory (simulated)")]

    def failing_once(rows):
        if failures:
            raise failures.pop()
        step(rows)
    tiny_engine.scheduler.decoder.step = failing_once
    with serve_in_process(tiny_engine) as url:
        failed = _chat(url, max_tokens=3)
        assert failed.status_code == 500 and "out of memory (simulated)" in failed.json()["error"]["message"]
        ok = _chat(url, max_tokens=3, ignore_eos=True)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        assert httpx.get(f"{url}/health", timeout=10).json()["requests"]["failed"] == 1


def test_prompts_and_replies_are_logged_only_with_log_prompts(tiny_engine, caplog):
    for log_prompts in (False, True):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="offload_runtime.serve"):
            with serve_in_process(tiny_engine, log_prompts=log_prompts) as url:
                r = _chat(url, max_tokens=3, ignore_eos=True)
                assert r.status_code == 200
                reply = r.json()["choices"][0]["message"]["content"]
        text = "\n".join(rec.getMessage() for rec in caplog.records)
        assert "3 new tokens" in text  # the statistics line is always there
        assert ("the cat sat" in text) == log_prompts
        assert (f"reply: {reply!r}" in text) == log_prompts


def test_the_scheduler_counts_its_sweeps(tiny_engine):
    reqs = [tiny_engine.request([5, 6, 7], max_new_tokens=m, temperature=0, ignore_eos=True) for m in (4, 9, 6)]
    list(tiny_engine.run(reqs))
    assert tiny_engine.scheduler.sweeps == tiny_engine.last_call.steps > 0


# --- the command line


def test_a_warning_when_listening_beyond_loopback_without_a_key():
    for host in ("0.0.0.0", "192.168.1.20", "::", "my-box.example"):
        assert "without --api-key" in exposure_warning(host, None)
        assert exposure_warning(host, "k") is None
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert exposure_warning(host, None) is None


def test_bad_flags_and_a_taken_port_are_one_line_errors_before_loading():
    with pytest.raises(UsageError, match="--port"):
        serve_main(["--port", "70000"])
    with pytest.raises(UsageError, match="--batch-size"):
        serve_main(["--batch-size", "0"])
    with pytest.raises(UsageError, match="--api-key is empty"):
        serve_main(["--api-key", " "])
    with pytest.raises(UsageError, match="cannot read memory size 'lots'"):
        serve_main(["--max-request-bytes", "lots"])
    with pytest.raises(UsageError, match="--max-request-bytes"):
        serve_main(["--max-request-bytes", "1KB"])  # sizes are read (here below the 1,024-byte floor)
    taken = bind("127.0.0.1", 0)
    try:
        with pytest.raises(UsageError, match="pick another --port"):
            serve_main(["--port", str(taken.getsockname()[1]), "--model", "/nonexistent/never/loaded"])
    finally:
        taken.close()


def test_ctrl_c_ends_a_stream_in_flight_with_an_error_and_done_and_exits_cleanly(tmp_path):
    log = tmp_path / "serve.log"
    with launched(["--model", "demo", "--device", "cpu", "--plan", "none", "--api-key", KEY], log, env=ENV) as s:
        with httpx.Client(timeout=60) as http:
            response = _open_stream(http, s, 0)
            lines = response.iter_lines()
            assert '"role": "assistant"' in next(line for line in lines if line)  # the reply has begun
            s.process.send_signal(signal.SIGINT)
            rest = [line for line in lines if line]
        assert s.process.wait(timeout=15) == 130  # well within uvicorn's graceful 5 s after the step in flight
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2].removeprefix("data: "))["error"]["message"] == \
        "the server is shutting down; retry later"
    text = log.read_text()
    assert "Application shutdown complete" in text and "Traceback" not in text


# --- the load benchmark


def test_the_load_benchmark_loses_no_request_and_its_clients_share_sweeps(tmp_path):
    bench = load_tool("bench_serve")
    out = bench.run(["--small", "--no-write", "--workdir", str(tmp_path)])
    assert [lv.clients for lv in out.levels] == [1, 4]
    for lv in out.levels:
        assert (lv.completed, lv.errors, lv.lost) == (lv.sent, 0, 0) and lv.sent == lv.clients
        assert lv.tokens == lv.sent * 8  # ignore_eos: every request its full length
        assert all(0 < o.ttft_s <= o.wall_s for o in lv.outcomes)
        assert lv.ttft(50) <= lv.ttft(99)
    one, four = out.levels
    assert four.sweeps_per_token < one.sweeps_per_token  # four rows verified in the same sweeps
    row = out.table.row(model="small", clients=4)
    assert (row["completed"], row["lost"], row["sweeps_per_token"]) == (4, 0, four.sweeps_per_token)
    assert out.command == f"python tools/bench_serve.py --small --no-write --workdir {tmp_path}"
