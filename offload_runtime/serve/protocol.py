"""The OpenAI wire format: request bodies checked field by field, and the response, chunk and error objects.

Pure functions over JSON values (no web framework), so what a client may send is decided in one place:
every field the server honours is parsed here; a known OpenAI parameter that it does not implement is accepted
only with its neutral value (`n: 1`, `logprobs: false`, `tools: []`, ...) and otherwise refused with a 400
naming it; a field OpenAI does not know either is refused too, as OpenAI refuses it. Sampling values go
through the runtime's own checks (check_warp, check_max_new_tokens, check_seed), so the server accepts exactly
what `Engine.generate` accepts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..api.options import check_max_new_tokens, check_seed
from ..api.text import normalise_stop
from ..errors import UsageError
from ..spec.sampling import check_warp

Json = dict[str, Any]


class ApiError(Exception):
    """A request the server answers with an OpenAI error object instead of a completion."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> Json:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> Json:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# --- which fields a request may carry

ANY = object()  # a field that does not change the output (user, metadata, ...): accepted with any value

# OpenAI parameters this server does not implement, with the values that mean "not used".
NEUTRAL: dict[str, tuple[Any, ...] | object] = {
    "n": (None, 1),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "store": (None, False),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "parallel_tool_calls": ANY,
    "user": ANY,
    "metadata": ANY,
    "service_tier": ANY,
}
WHY = {"n": "one choice per request; send several requests instead, they share each weight sweep",
       "logprobs": "log-probabilities are not returned", "top_logprobs": "log-probabilities are not returned",
       "tools": "tool calling is not supported", "tool_choice": "tool calling is not supported",
       "functions": "function calling is not supported", "function_call": "function calling is not supported",
       "response_format": "structured output is not supported", "echo": "the prompt is not echoed",
       "best_of": "one candidate per request"}

COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
          "ignore_eos"}  # ignore_eos: an extension (vLLM has it too), for fixed-length benchmarks
FIELDS = {"chat": COMMON | {"messages", "max_completion_tokens"}, "text": COMMON | {"prompt"}}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class CompletionSpec:
    """One checked request: what to run and how to answer."""

    kind: str  # "chat" (/v1/chat/completions) | "text" (/v1/completions)
    messages: list[dict[str, str]] | None
    prompt: str | list[int] | None
    temperature: float | None  # None: the checkpoint's generation_config.json decides
    top_p: float | None
    max_tokens: int | None
    seed: int | None
    ignore_eos: bool
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def parse_request(body: Any, kind: str, served: str) -> CompletionSpec:
    """Check a request body for `kind`; raises ApiError (400, or 404 for another model) naming the field."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    for name, value in body.items():
        if name in FIELDS[kind]:
            continue
        if name not in NEUTRAL:
            raise bad(f"unrecognized request argument supplied: {name}", param=name, code="unsupported_parameter")
        accepted = NEUTRAL[name]
        if accepted is not ANY and not any(_same(value, a) for a in accepted):
            why = WHY.get(name, "this server does not implement it")
            raise bad(f"{name}={value!r} is not supported ({why}); drop {name}", param=name,
                      code="unsupported_parameter")
    model = body.get("model")
    if model is not None and model != served:
        raise ApiError(404, f"the model {model!r} does not exist here; this server serves {served!r} "
                            f"(GET /v1/models)", param="model", code="model_not_found")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options is only allowed with stream=true", param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("stream_options takes only include_usage", param="stream_options")
        include_usage = _flag(options, "include_usage", "stream_options.include_usage")
    messages = prompt = None
    if kind == "chat":
        messages = _messages(body)
        max_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens")
    else:
        prompt = _prompt(body)
        max_tokens = _max_tokens(body, "max_tokens")
    temperature, top_p = body.get("temperature"), body.get("top_p")
    _check(lambda: check_warp(1.0 if temperature is None else temperature, 1.0), "temperature")
    _check(lambda: check_warp(1.0, 1.0 if top_p is None else top_p), "top_p")
    seed = body.get("seed")
    if seed is not None:
        _check(lambda: check_seed(seed), "seed")
    stop = _check(lambda: normalise_stop(body.get("stop")), "stop")
    return CompletionSpec(kind, messages, prompt, temperature, top_p, max_tokens, seed,
                          _flag(body, "ignore_eos"), stop, stream, include_usage)


def _same(value: Any, neutral: Any) -> bool:
    # 0.0 is as neutral as 0, but true is not 1
    return isinstance(value, bool) == isinstance(neutral, bool) and value == neutral


def _check(run: Callable[[], Any], param: str) -> Any:
    try:
        return run()
    except UsageError as e:
        raise bad(str(e), param=param) from None


def _flag(body: Json, name: str, label: str | None = None) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad(f"{label or name} must be true or false, got {value!r}", param=label or name)
    return bool(value)


def _max_tokens(body: Json, *names: str) -> int | None:
    given = [n for n in names if body.get(n) is not None]
    if len(given) > 1 and body[given[0]] != body[given[1]]:
        raise bad(f"{given[0]} and {given[1]} disagree; give one of them", param=given[1])
    if not given:
        return None
    name, value = given[0], body[given[0]]
    try:
        return check_max_new_tokens(value)
    except UsageError:  # its message names the engine's argument, not the API's
        raise bad(f"{name} must be a whole number >= 1, got {value!r}", param=name) from None


def _messages(body: Json) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise bad("messages is required: a list of {role, content} objects", param="messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with role and content", param=where)
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise bad(f"{where}.{extra[0]} is not supported (text messages only)", param=f"{where}.{extra[0]}")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role must be one of system, developer, user, assistant; got {role!r}",
                      param=f"{where}.role")
        out.append({"role": ROLES[role], "content": _content(m.get("content"), where)})
    return out


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (joined by newlines)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"{where}.content[{j}] is a {kind!r} part; only text parts are supported",
                          param=f"{where}.content")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")


def _prompt(body: Json) -> str | list[int]:
    """One prompt: a string or a list of token ids (a list holding exactly one of either is taken too)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt is required: a string or a list of token ids", param="prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise bad(f"one prompt per request, got {len(prompt)}; send them as separate requests (they share "
                      f"each weight sweep)", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise bad("prompt must be a string or a non-empty list of token ids", param="prompt")


# --- responses


def usage_body(prompt_tokens: int, completion_tokens: int) -> Json:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class ReplyHead:
    """What every object of one reply repeats."""

    kind: str
    id: str
    created: int
    model: str

    def _base(self, object_suffix: str) -> Json:
        name = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": name + object_suffix, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def completion(self, text: str, finish_reason: str, usage: Json) -> Json:
        """The whole reply (stream=false)."""
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._base(""), "choices": [choice], "usage": usage}

    def chunk(self, *, text: str | None = None, role: bool = False, finish_reason: str | None = None,
              usage: Json | None = None, include_usage: bool = False, final_usage: bool = False) -> Json:
        """One streamed chunk: a piece of text (or the opening role), the finish reason, or (with
        stream_options.include_usage) the closing usage chunk, whose choices are empty."""
        body = self._base(".chunk") if self.kind == "chat" else self._base("")
        if final_usage:
            return {**body, "choices": [], "usage": usage}
        if self.kind == "chat":
            delta: Json = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        body["choices"] = [choice]
        if include_usage:
            body["usage"] = None
        return body
