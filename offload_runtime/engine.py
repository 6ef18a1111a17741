"""Engine: load a target (and a draft), then generate, stream and chat.

    engine = Engine.from_pretrained("llama-2-70b", gpu_memory="20GiB")
    for r in engine.generate(["The capital of France is", "def fib(n):"], max_new_tokens=64):
        print(r.text, r.stats.tokens_per_step)

Text lives here; the decoder below knows only token ids.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from . import registry
from .checkpoint import Checkpoint, load_tokenizer, resolve_model_dir
from .config import ModelArgs
from .decoder import Decoder, Request, SamplingParams, SequenceStats
from .errors import CheckpointError, ContextLengthError, UsageError
from .kv_cache import KVCache
from .loader import Residency, build_model, choose_residency, fixed_device_bytes
from .memory import parse_bytes
from .model import Transformer
from .sampling import make_generator
from .streaming import StreamedLayers, SweepStats
from .tree import Tree

Prompt = str | Sequence[int]
SPEC_METHODS = ("sequoia", "specinfer", "topk")  # how sampled trees are drawn and verified (greedy is automatic)
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class GenerationResult:
    text: str | None  # None when the checkpoint has no tokenizer
    token_ids: list[int]  # the new tokens only
    prompt_token_ids: list[int]
    finish_reason: str  # "eos" | "length" | "stop" | "context" | "interrupted"
    stats: SequenceStats = field(repr=False)


# --- argument parsing shared by the API and the command lines


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise UsageError(f"dtype {dtype} is not supported; use one of float64, float32, bfloat16, float16")
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cpu":
            return torch.float32  # 16-bit matmuls are slow on most CPUs
        return DTYPES.get(str(checkpoint_dtype), torch.float16) if checkpoint_dtype != "float32" else torch.float16
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use one of float64, float32, bfloat16, float16")
    return DTYPES[dtype]


def parse_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise UsageError(f"device type {dev.type!r} is not supported; use cpu or cuda")
    return dev


def check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    if not isinstance(temperature, (int, float)) or temperature != temperature or not 0 <= temperature <= 100:
        raise UsageError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")


def _read_generation_config(path: Path) -> dict[str, Any]:
    f = path / "generation_config.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{f} is not valid JSON; fix or delete it") from None


# --- loading


def _load(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, residency: Residency, label: str,
          progress: bool) -> Transformer:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=ckpt.args.n_layers, desc=f"loading {label}", unit="layer", leave=False, file=sys.stderr)
    try:
        return build_model(ckpt, device, dtype, residency, bar)
    finally:
        if bar is not None:
            bar.close()


def _open_checkpoint(name: str) -> tuple[Path, Checkpoint]:
    path = resolve_model_dir(registry.resolve_name(name))
    ckpt = Checkpoint(path)
    ckpt.validate()
    return path, ckpt


def check_vocab_compatible(target_args: ModelArgs, draft_args: ModelArgs, target_tok, draft_tok,
                           target_name: str, draft_name: str) -> None:
    """The draft must speak the target's vocabulary; padded embedding sizes may differ."""
    if target_tok is not None and draft_tok is not None:
        tv, dv = target_tok.get_vocab(), draft_tok.get_vocab()
        shared = set(tv) & set(dv)
        same = len(shared) >= 0.99 * min(len(tv), len(dv)) and all(tv[t] == dv[t] for t in shared)
        if not same:
            raise UsageError(
                f"draft {draft_name} has another vocabulary than target {target_name}; pick a draft of the same "
                f"model family (same tokenizer), or run without one (--no-draft)"
            )
    elif target_args.vocab_size != draft_args.vocab_size:
        raise UsageError(
            f"draft {draft_name} has vocab_size {draft_args.vocab_size} but target {target_name} has "
            f"{target_args.vocab_size}; pick a draft with the target's vocabulary, or run without one (--no-draft)"
        )


# --- the engine


class Engine:
    def __init__(self, target: Transformer, draft: Transformer | None, tokenizer, *, max_seq_len: int,
                 batch_size: int = 1, tree: Tree | None = None, method: str = "sequoia",
                 generation_config: dict[str, Any] | None = None, eos_ids: Sequence[int] = (),
                 name: str = "model", max_chunk: int = 2048):
        self.target, self.draft, self.tokenizer = target, draft, tokenizer
        self.name = name
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.generation_config = generation_config or {}
        self.eos_ids = frozenset(eos_ids)
        dtype = target.dtype
        target_cache = KVCache(target.args, batch_size, max_seq_len, dtype, target.device)
        draft_cache = KVCache(draft.args, batch_size, max_seq_len, draft.dtype, draft.device) if draft else None
        self.decoder = Decoder(target, target_cache, draft, draft_cache, tree, method=method, max_chunk=max_chunk)
        self.residency: Residency | None = None
        self.plan = None  # the planner's Plan this engine follows, if any
        self._row_owner: list[Request | None] = [None] * batch_size
        self.last_stats: list[SequenceStats] = []

    # --- construction

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, *, draft: str | os.PathLike | None | bool = None,
                        device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                        offload: bool | None = None, gpu_memory: str | int | None = None,
                        max_seq_len: int | None = None, batch_size: int = 1, tree: Sequence[int] | Tree | None = None,
                        method: str = "sequoia", plan: str | os.PathLike | None = "auto", slots: int = 2,
                        resident_layers: int | None = None, max_chunk: int = 2048,
                        progress: bool | None = None, quiet: bool = False) -> "Engine":
        """Load a target and (optionally) a draft.

        model / draft: a checkpoint directory, a Hugging Face repo id, or an alias (`demo`, `llama-2-70b`, ...).
        draft=None takes the model's default draft when it has one; draft=False decodes without one.
        offload: stream the target's layers from host RAM (None: only when it does not fit `gpu_memory`).
        gpu_memory: the device budget ("20GiB"); default: the GPU's free memory (none on the CPU).
        tree: a parent array overriding the plan's tree.
        plan: "auto" uses the planner's plan for this machine and model pair (one line on stderr says which, or
        that none matched and the default tree is used); a path uses that plan file; None skips plans.
        """
        dev = parse_device(device)
        model = str(model)
        progress = sys.stderr.isatty() if progress is None else progress
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        if slots < 1:
            raise UsageError(f"slots must be >= 1, got {slots}")
        if method not in SPEC_METHODS:
            raise UsageError(f"unknown verification method {method!r}; use one of {', '.join(SPEC_METHODS)}")
        target_path, target_ckpt = _open_checkpoint(model)
        targs = target_ckpt.args
        dt = parse_dtype(dtype, dev, targs.torch_dtype)
        limit = targs.max_position_embeddings
        seq_len = min(limit, 4096) if max_seq_len is None else int(max_seq_len)
        if not 1 <= seq_len <= limit:
            raise UsageError(f"max_seq_len must be between 1 and the model's context window ({limit}), got {max_seq_len}")
        tokenizer = load_tokenizer(target_path)
        draft_name = registry.default_draft(model) if draft is None else (None if draft is False else str(draft))
        draft_ckpt = None
        if draft_name is not None:
            draft_path, draft_ckpt = _open_checkpoint(draft_name)
            check_vocab_compatible(targs, draft_ckpt.args, tokenizer, load_tokenizer(draft_path), model, draft_name)
        plan_obj = None
        if draft_ckpt is not None and tree is None and plan is not None:
            plan_obj = _find_plan(plan, model, draft_name, dev, dt, batch_size, quiet)  # names, as the user gave them
            if plan_obj is not None:
                tree = plan_obj.tree
                if gpu_memory is None and resident_layers is None and plan_obj.offload:
                    gpu_memory = plan_obj.gpu_memory  # the budget the plan chose its resident layers for
        chosen_tree = _choose_tree(tree, dev) if draft_ckpt is not None else None
        fixed = fixed_device_bytes(targs, dt, draft_args=draft_ckpt.args if draft_ckpt else None, batch=batch_size,
                                   max_seq_len=seq_len, tree_size=len(chosen_tree) if chosen_tree else 1,
                                   max_chunk=max_chunk, slots=slots, on_cuda=dev.type == "cuda")
        residency = choose_residency(targs, dt, dev, offload=offload,
                                     budget_bytes=None if gpu_memory is None else parse_bytes(gpu_memory),
                                     fixed=fixed, slots=slots, resident_layers=resident_layers)
        target = _load(target_ckpt, dev, dt, residency, "target", progress)
        draft_model = None
        if draft_ckpt is not None:
            draft_model = _load(draft_ckpt, dev, dt, Residency(False, tuple(range(draft_ckpt.args.n_layers)), 0, None),
                                "draft", progress)
        gen_cfg = _read_generation_config(target_path)
        eos = set(target_ckpt.args.eos_token_ids)
        g_eos = gen_cfg.get("eos_token_id")
        eos.update(g_eos if isinstance(g_eos, list) else ([g_eos] if g_eos is not None else []))
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        engine = cls(target, draft_model, tokenizer, max_seq_len=seq_len, batch_size=batch_size, tree=chosen_tree,
                     method=method, generation_config=gen_cfg, eos_ids=eos, name=model, max_chunk=max_chunk)
        engine.residency = residency
        engine.plan = plan_obj
        return engine

    # --- introspection

    @property
    def offloaded(self) -> bool:
        return isinstance(self.target.layers, StreamedLayers)

    def sweep_stats(self) -> list[SweepStats]:
        """Per-sweep bytes, time, GB/s and copy waits of the streamed target (empty when nothing streams)."""
        return self.target.layers.resolve_stats() if self.offloaded else []

    # --- prompts and text

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UsageError(f"{self.name} ships no tokenizer, so prompts must be lists of token ids")
            ids = list(self.tokenizer(prompt).input_ids)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise UsageError("the prompt is empty")
        vocab = self.target.args.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        return ids

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        if self.tokenizer is None:
            raise UsageError(f"{self.name} ships no tokenizer, so it cannot format chat messages")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise UsageError("each chat message must be a dict with 'role' and 'content'")
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
            ids = list(self.tokenizer(text, add_special_tokens=False).input_ids)
            bos = self.tokenizer.bos_token_id
            if bos is not None and self.tokenizer.bos_token and not text.startswith(self.tokenizer.bos_token) \
                    and self._adds_bos():
                ids = [bos] + ids
            return ids
        # No template: a plain transcript ending where the assistant speaks.
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode(text)

    def _adds_bos(self) -> bool:
        bos = self.tokenizer.bos_token_id
        probe = self.tokenizer("a").input_ids
        return bool(probe) and probe[0] == bos

    def decode(self, ids: Sequence[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # --- sampling defaults

    def sampling_params(self, temperature: float | None, top_p: float | None, max_new_tokens: int | None,
                        ignore_eos: bool, seed: int | None) -> SamplingParams:
        g = self.generation_config
        if temperature is None:
            temperature = float(g.get("temperature", 1.0)) if g.get("do_sample") else 0.0
        if top_p is None:
            top_p = float(g.get("top_p", 1.0)) if g.get("do_sample") else 1.0
        if max_new_tokens is None:
            max_new_tokens = int(g.get("max_new_tokens") or 256)
        check_sampling(temperature, top_p, max_new_tokens)
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        return SamplingParams(float(temperature), float(top_p), int(max_new_tokens), bool(ignore_eos), int(seed))

    def _new_request(self, ids: list[int], params: SamplingParams, stop: Sequence[str] = ()) -> Request:
        if len(ids) + 1 > self.max_seq_len:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens but the context window holds {self.max_seq_len}; shorten the "
                f"prompt{' or raise max_seq_len' if self.max_seq_len < self.target.args.max_position_embeddings else ''}"
            )
        req = Request(tokens=list(ids), params=params, eos_ids=self.eos_ids)
        req.rng = make_generator(params.seed)
        req.draft_rng = make_generator(params.seed + 1, self.draft.device if self.draft else "cpu")
        self._set_stop(req, stop)
        return req

    def _set_stop(self, req: Request, stop: Sequence[str] | str) -> None:
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        if stop and self.tokenizer is None:
            raise UsageError("stop strings need a tokenizer; this checkpoint has none")
        req.stop = stop

        def check(r: Request, new: list[int]) -> bool:
            return _cut_at_stop(self.decode(r.generated) or "", stop)[1]
        req.on_tokens = check if stop else None

    # --- the scheduling loop

    def _steps(self, requests: list[Request]) -> Iterator[list[Request]]:
        """Run requests, up to batch_size at a time; after every sweep yields the requests that finished."""
        waiting = list(requests)
        rows: list[Request | None] = [None] * self.batch_size
        while waiting or any(r is not None for r in rows):
            for b in range(self.batch_size):
                if rows[b] is None and waiting:
                    req = waiting.pop(0)
                    if req.row != b or self._row_owner[b] is not req:
                        req.target_cached = req.draft_cached = 0  # its K/V (if any) lives elsewhere
                    req.row = b
                    self._row_owner[b] = req
                    rows[b] = req
            self.decoder.step(rows)
            finished = []
            for b, req in enumerate(rows):
                if req is not None and req.done:
                    rows[b] = None
                    finished.append(req)
            yield finished

    def _result(self, req: Request) -> GenerationResult:
        text = self.decode(req.generated)
        if text is not None:
            text = _cut_at_stop(text, req.stop)[0]
        return GenerationResult(text, list(req.generated), list(req.tokens[: req.n_prompt]),
                                req.finish_reason or "interrupted", req.stats)

    # --- public API

    def request(self, prompt: Prompt | None = None, *, messages: Sequence[dict[str, str]] | None = None,
                max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                seed: int | None = None, ignore_eos: bool = False, stop: Sequence[str] | str = ()) -> Request:
        """A request for `run`: a prompt (text or token ids) or chat messages, with its own sampling settings."""
        if (prompt is None) == (messages is None):
            raise UsageError("give either a prompt or chat messages")
        ids = self.encode(prompt) if messages is None else self.apply_chat_template(messages)
        return self._new_request(ids, self.sampling_params(temperature, top_p, max_new_tokens, ignore_eos, seed), stop)

    def run(self, requests: Sequence[Request]) -> Iterator[tuple[int, GenerationResult]]:
        """Decode requests up to batch_size at a time; yields (index, result) as each one finishes."""
        index = {id(r): i for i, r in enumerate(requests)}
        for finished in self._steps(list(requests)):
            for req in finished:
                yield index[id(req)], self._result(req)

    def generate(self, prompts: Prompt | Sequence[Prompt], *, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | Sequence[int] | None = None,
                 ignore_eos: bool = False, stop: Sequence[str] | str = ()) -> list[GenerationResult]:
        """One GenerationResult per prompt. A prompt is a string or a list of token ids.

        With several prompts and one seed, prompt i uses seed + i (so it gives the tokens it gives alone with
        that seed); a list of seeds gives one per prompt.
        """
        batch = _as_prompt_list(prompts)
        if isinstance(seed, (list, tuple)):
            if len(seed) != len(batch):
                raise UsageError(f"got {len(seed)} seeds for {len(batch)} prompts")
            seeds = [int(s) for s in seed]
        else:
            base = int.from_bytes(os.urandom(4), "little") if seed is None else int(seed)
            seeds = [base + i for i in range(len(batch))]
        requests = [self.request(p, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=s,
                                 ignore_eos=ignore_eos, stop=stop) for p, s in zip(batch, seeds)]
        results: list[GenerationResult | None] = [None] * len(requests)
        for i, result in self.run(requests):
            results[i] = result
        self.last_stats = [r.stats for r in requests]
        return results  # type: ignore[return-value]

    def chat(self, messages: Sequence[dict[str, str]], **kwargs: Any) -> GenerationResult:
        """Generate the assistant's reply to chat-formatted messages."""
        return self.generate([self.apply_chat_template(messages)], **kwargs)[0]

    def stream(self, prompt: Prompt, **kwargs: Any) -> Iterator[str]:
        """Yield the reply's text piece by piece as tokens are accepted."""
        session = self.session()
        yield from session.stream_ids(self.encode(prompt), **kwargs)

    def session(self) -> "ChatSession":
        return ChatSession(self)


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class ChatSession:
    """A conversation whose K/V stays cached across turns: each turn only runs its new tokens."""

    def __init__(self, engine: Engine):
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
                   stop: Sequence[str] = ()) -> Iterator[str]:
        eng = self.engine
        params = eng.sampling_params(temperature, top_p, max_new_tokens, ignore_eos, seed)
        if self.request is None:
            self.request = eng._new_request(ids, params, stop)
        else:
            if len(ids) + 1 > eng.max_seq_len:
                raise ContextLengthError(
                    f"the conversation has {len(ids)} tokens but the context window holds {eng.max_seq_len}; "
                    f"start over with /reset (or Engine.session())"
                )
            req = self.request
            req.reset_tokens(ids)
            req.params = params
            req.stats = SequenceStats(prompt_tokens=len(ids))
            eng._set_stop(req, stop)
        req = self.request
        shown = ""
        self.interrupted = False
        for _ in eng._steps([req]):
            text = eng.decode(req.generated)
            if text is None:
                continue
            text = _cut_at_stop(text, req.stop)[0]
            # Hold back a trailing replacement char: the next token may complete a multi-byte character.
            stable = text.rstrip("\ufffd") if not req.done else text
            if len(stable) > len(shown) and stable.startswith(shown):
                yield stable[len(shown):]
                shown = stable
            if self.interrupted:
                req.finish_reason = req.finish_reason or "interrupted"
                break
        eng.last_stats = [req.stats]

    def send(self, content: str, role: str = "user", **kwargs: Any) -> Iterator[str]:
        """Add a message, stream the assistant's reply, and add the reply to the conversation."""
        self.messages.append({"role": role, "content": content})
        pieces: list[str] = []
        try:
            ids = self.engine.apply_chat_template(self.messages)
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


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise UsageError("no prompts given")
    if all(isinstance(t, int) for t in prompts):
        return [prompts]
    return prompts


def _find_plan(plan: str | os.PathLike, target: str, draft: str, device: torch.device, dtype: torch.dtype,
               batch_size: int, quiet: bool):
    from planner.plan import find_plan, load_plan

    if str(plan) == "auto":
        found, message = find_plan(target, draft, device, dtype, batch_size=batch_size)
    else:
        found, message = load_plan(plan, target=target, draft=draft, device=device, dtype=dtype)
    if not quiet:
        print(message, file=sys.stderr)
    return found


def _choose_tree(tree: Sequence[int] | Tree | None, device: torch.device) -> Tree:
    if isinstance(tree, Tree):
        return tree
    if tree is not None:
        try:
            return Tree(tree)
        except ValueError as e:
            raise UsageError(f"invalid tree: {e}") from None
    from planner.tree_search import DEFAULT_ACCEPTANCE, best_tree

    # Without a plan: a GPU verifies a bigger tree for about the price of one token (more so when streaming);
    # a CPU's verification cost grows with the tree at once.
    return Tree(best_tree(DEFAULT_ACCEPTANCE, 64 if device.type == "cuda" else 16, 8 if device.type == "cuda" else 6)[1])
