"""Text: tokenizers, chat templates, a reply's text as its tokens arrive (incremental detokenising, stop strings),
and chat sessions. The decoder below knows only token ids.

Detokenising a reply once per step from its first token would cost O(n^2) over an n-token reply; `TextStream`
decodes only a short window per step (the tokens since the last settled point, after a few tokens of context
so spacing and merges come out as in a full decode) and looks for stop strings only where new text could
complete one, so a whole reply costs O(n).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..decode.request import Request
from ..errors import CheckpointError, ContextLengthError, UsageError

REPLACEMENT = "\ufffd"  # what a decoder shows for the bytes of a character not complete yet


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer through AutoTokenizer, or None when it ships none (token-id prompts only). For a
    GGUF file, transformers builds it (and its chat template) from the file's metadata."""
    path = Path(path)
    if path.suffix == ".gguf":
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"the tokenizer in {path} could not be built from its metadata ({e}); "
                                  f"re-download the file") from None
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"the tokenizer in {path} could not be loaded ({e}); re-download tokenizer files") from None


def normalise_stop(stop: Sequence[str] | str | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise UsageError(f"stop must be a string or a list of strings, got {stop!r}"[:200])
    for s in stop:
        check_text(s, "a stop string")
    return tuple(s for s in stop if s)


def check_prompt(prompt: Any) -> str | list[int]:
    """A prompt's form: text, or a non-empty list of token ids (the vocabulary is checked when it is encoded)."""
    if isinstance(prompt, str):
        return check_text(prompt, "the prompt")
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                        for t in prompt):
        raise UsageError(f"a prompt is a string or a list of token ids (integers), got {type(prompt).__name__}"
                         + (f" {prompt!r}"[:80] if not isinstance(prompt, (list, tuple)) else " of other values"))
    if not prompt:
        raise UsageError("the prompt is empty")
    return list(prompt)


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages' form: a non-empty list of {'role': str, 'content': str} (the template judges the roles)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UsageError("chat messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UsageError("each chat message must be an object with a string 'role' and a string 'content'")
        check_text(m["content"], f"the content of a {m['role']!r} message")
    return list(messages)


def check_text(text: str, what: str) -> str:
    """`text` as given, when a tokenizer can take it: lone surrogates (what undecodable input bytes become
    under Python's surrogateescape) cannot be encoded, and tokenizers fail on them with unrelated errors."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{what} is not valid text: character {e.start} is a lone surrogate {text[e.start]!r} "
                         f"(undecodable bytes, e.g. input that is not UTF-8); fix the encoding") from None
    return text


class TextStream:
    """The text of a reply whose tokens arrive a few at a time, with its stop strings.

    `text` is everything decoded so far (a character still incomplete is held back); `stop_at` is where the
    first stop string begins, once one has appeared; `settled()` is the text that can be shown for good.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.stop_at: int | None = None
        self._prefix = 0  # ids[_prefix:_read] decode to the text's last settled piece (context for the next)
        self._read = 0
        self.decoded_tokens = 0  # tokens passed to the tokenizer's decode, all calls together (for tests)

    def _decode(self, ids: list[int]) -> str:
        self.decoded_tokens += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def stopped(self) -> bool:
        return self.stop_at is not None

    def add(self, new_ids: Sequence[int]) -> None:
        self.ids.extend(new_ids)
        before = self._decode(self.ids[self._prefix: self._read])
        window = self._decode(self.ids[self._prefix:])
        if len(window) <= len(before) or window.endswith(REPLACEMENT):
            return  # nothing new, or a character still incomplete: wait for more tokens
        self._append(window[len(before):])
        self._prefix, self._read = self._read, len(self.ids)

    def finish(self) -> None:
        """The reply is over: what was held back (a truncated character) becomes text too."""
        before = self._decode(self.ids[self._prefix: self._read])
        window = self._decode(self.ids[self._prefix:])
        if len(window) > len(before):
            self._append(window[len(before):])
        self._prefix = self._read = len(self.ids)

    def _append(self, piece: str) -> None:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=1) + 1)
        self.text += piece
        if self.stop_at is None and self.stop:
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stop_at = min(hits)

    def result(self) -> str:
        """The reply's text: cut before the first stop string."""
        return self.text if self.stop_at is None else self.text[: self.stop_at]

    def settled(self) -> str:
        """Text that stays whatever comes next: the result, less a tail that could still begin a stop string."""
        if self.stop_at is not None or not self.stop:
            return self.result()
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return self.text[: len(self.text) - hold]


class TextCodec:
    """A model's tokenizer seen by the engine: prompts and chat messages to ids, ids to text."""

    def __init__(self, tokenizer: Any, vocab_size: int, name: str):
        self.tokenizer, self.vocab_size, self.name = tokenizer, vocab_size, name

    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise UsageError(f"{self.name} ships no tokenizer, so {what}")

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        prompt = check_prompt(prompt)
        if isinstance(prompt, str):
            self._need_tokenizer("prompts must be lists of token ids")
            ids = list(self.tokenizer(prompt, verbose=False).input_ids)  # too long is said in our words
        else:
            ids = prompt
        if not ids:
            raise UsageError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return ids

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        self._need_tokenizer("it cannot format chat messages")
        messages = check_messages(messages)
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = self._render(messages)
            ids = list(tok(text, add_special_tokens=False, verbose=False).input_ids)
            bos = tok.bos_token_id
            if bos is not None and tok.bos_token and not text.startswith(tok.bos_token) and self._adds_bos():
                ids = [bos] + ids
            return ids
        # No template: a plain transcript ending where the assistant speaks.
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode(text)

    def _render(self, messages: Sequence[dict[str, str]]) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        except (TemplateError, ValueError, TypeError) as e:  # the template's own checks (roles, order) raise these
            roles = ", ".join(repr(m["role"]) for m in messages)
            raise UsageError(f"{self.name}'s chat template rejects these messages (roles {roles}): {e}"[:400]) \
                from None

    def _adds_bos(self) -> bool:
        probe = self.tokenizer("a").input_ids
        return bool(probe) and probe[0] == self.tokenizer.bos_token_id

    def decode(self, ids: Sequence[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def stream(self, stop: Sequence[str] = ()) -> TextStream | None:
        if stop:
            self._need_tokenizer("stop strings cannot be matched")
        return None if self.tokenizer is None else TextStream(self.tokenizer, stop)


def watch(request: Request, stream: TextStream | None) -> None:
    """Feed the request's new tokens to `stream`, and end the request where a stop string appears."""
    if stream is None:
        return

    def check(req: Request, new: list[int]) -> int | None:
        for i, token in enumerate(new):  # one at a time: the reply ends at the token that completes a stop string
            stream.add([token])
            if stream.stopped:
                return i + 1
        return None
    request.stop_check = check


class ChatSession:
    """A conversation whose K/V stays cached across turns: each turn only runs its new tokens."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.messages: list[dict[str, str]] = []
        self.request: Request | None = None
        self.interrupted = False  # set (e.g. from a SIGINT handler) to end the current reply after this step
        self.streaming = False

    def reset(self) -> None:
        self.messages = []
        self.request = None

    def stream_ids(self, ids: list[int], *, max_new_tokens: int | None = None, temperature: float | None = None,
                   top_p: float | None = None, seed: int | None = None, ignore_eos: bool = False,
                   stop: Sequence[str] | str = ()) -> Iterator[str]:
        eng = self.engine
        stop = normalise_stop(stop)
        if self.request is None:
            self.request = eng.new_request(ids, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                           ignore_eos=ignore_eos, seed=seed)
        else:
            if len(ids) + 1 > eng.max_seq_len:
                raise ContextLengthError(
                    f"the conversation has {len(ids)} tokens but the context window holds {eng.max_seq_len} (at "
                    f"most {eng.max_seq_len - 1}, to leave room for a reply); start a new conversation (/reset "
                    f"in the chat, a new Engine.session() in Python)"
                )
            eng.renew_request(self.request, ids, temperature=temperature, top_p=top_p,
                              max_new_tokens=max_new_tokens, ignore_eos=ignore_eos, seed=seed)
        req = self.request
        text = eng.codec.stream(stop)
        watch(req, text)
        shown = ""
        self.interrupted = False
        mark = eng.begin_call()
        for _ in eng.scheduler.run([req]):
            if text is None:
                continue
            if req.done:  # over: what could have begun a stop string is the reply's end
                text.finish()
            settled = text.result() if req.done else text.settled()
            if len(settled) > len(shown):
                yield settled[len(shown):]
                shown = settled
            if self.interrupted and not req.done:
                eng.scheduler.cancel(req, "interrupted")
                break
        eng.finish_call([req], mark)
        if req.error is not None:
            self.request = None  # the next turn starts its caches over
            raise req.error

    def send(self, content: str, role: str = "user", **kwargs: Any) -> Iterator[str]:
        """Add a message, stream the assistant's reply, and add the reply to the conversation."""
        self.messages.append({"role": role, "content": content})
        pieces: list[str] = []
        try:
            ids = self.engine.codec.apply_chat_template(self.messages)
            self.streaming = True
            for piece in self.stream_ids(ids, **kwargs):
                pieces.append(piece)
                yield piece
        except BaseException:
            if not pieces:  # nothing said: the turn never happened
                self.messages.pop()
                raise
            self.messages.append({"role": "assistant", "content": "".join(pieces)})
            raise
        finally:
            self.streaming = False
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
