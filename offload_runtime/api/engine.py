"""Engine: a loaded target (and draft) that generates, streams and chats.

    engine = Engine.from_pretrained("llama-2-70b", gpu_memory="20GiB")
    for r in engine.generate(["The capital of France is", "def fib(n):"], max_new_tokens=64):
        print(r.text, r.stats.tokens_per_step)

The engine ties the layers together: options (api/options.py), loading (api/loading.py), the scheduler and the
three-phase decoder (decode/), text (api/text.py). It holds no logic of its own beyond turning calls into
requests and requests into results.
"""
from __future__ import annotations

import dataclasses
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence


from ..decode.decoder import Decoder
from ..decode.request import Request, SamplingParams, SequenceStats
from ..decode.scheduler import Scheduler
from ..decode.timing import StepTimes
from ..errors import ContextLengthError, UsageError
from ..model.kv_cache import KVCache
from ..model.transformer import Transformer
from ..model.tree import Tree
from ..residency import Residency
from ..spec.growth import DynamicTree
from ..spec.methods import Method
from ..spec.policy import TreePolicy, TreeSpec, default_tree, tree_option
from ..spec.sampling import make_generator
from ..streaming import StreamedLayers, SweepStats
from .options import GenerationDefaults, check_seed
from .text import ChatSession, TextCodec, TextStream, normalise_stop, watch

Prompt = str | Sequence[int]
TreeOption = Tree | DynamicTree | Sequence[int] | str | None  # per call: a tree, a growth policy, or a mode


@dataclass
class GenerationResult:
    text: str | None  # None when the checkpoint has no tokenizer
    token_ids: list[int]  # the new tokens only
    prompt_token_ids: list[int]
    finish_reason: str  # "eos" | "length" | "stop" | "context" | "interrupted" | "cancelled" | "error"
    stats: SequenceStats = field(repr=False)
    error: Exception | None = None  # what ended it when finish_reason is "error" (the other rows went on)


@dataclass
class CallStats:
    """One generate / run / stream call as a whole (its rows share every step)."""

    steps: int = 0  # target sweeps, prefill-only sweeps included
    draft_s: float = 0.0
    sweep_s: float = 0.0
    host_s: float = 0.0
    new_tokens: int = 0
    sweeps: list[SweepStats] = field(default_factory=list)  # per streamed sweep (empty when nothing streams)

    @property
    def time_s(self) -> float:
        return self.draft_s + self.sweep_s + self.host_s


@dataclass(frozen=True)
class CallMark:
    times: StepTimes
    sweeps: int


class Generations(list):
    """The results of one generate call, one per prompt in order, with the call's totals in `.stats`."""

    stats: CallStats


class Engine:
    def __init__(self, target: Transformer, draft: Transformer | None, tokenizer: Any, *, max_seq_len: int,
                 batch_size: int = 1, trees: TreePolicy | Tree | None = None, method: str | Method = "sequoia",
                 defaults: GenerationDefaults | None = None, eos_ids: Sequence[int] = (), name: str = "model",
                 max_chunk: int = 2048, residency: Residency | None = None, plans: Sequence[Any] = ()):
        self.target, self.draft = target, draft
        self.name = name
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.codec = TextCodec(tokenizer, target.args.vocab_size, name)
        self.defaults = defaults or GenerationDefaults()
        self.eos_ids = frozenset(eos_ids)
        if draft is None:
            trees = TreePolicy.one(Tree([-1]))
        elif not isinstance(trees, TreePolicy):
            trees = TreePolicy.one(trees) if trees is not None else TreePolicy(default_tree(target.device))
        self.trees = trees
        self.residency = residency
        self.plans = list(plans)  # the planner's plans this engine follows (api/plans.py), if any
        target_cache = KVCache(target.args, batch_size, max_seq_len, target.dtype, target.device)
        draft_cache = KVCache(draft.args, batch_size, max_seq_len, draft.dtype, draft.device) if draft else None
        self.decoder = Decoder(target, target_cache, draft, draft_cache, method=method, max_chunk=max_chunk)
        self.scheduler = Scheduler(self.decoder, batch_size)
        self._streams: "weakref.WeakKeyDictionary[Request, TextStream]" = weakref.WeakKeyDictionary()
        self.last_stats: list[SequenceStats] = []
        self.last_call = CallStats()

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, **options: Any) -> "Engine":
        """Load a target and (optionally) a draft; see api/loading.py `load` for every option.

        model / draft: a checkpoint directory, a GGUF file (or a directory holding one, or the first part of a split
            file), a Hugging Face repo id, or an alias (`demo`, `llama-2-70b`, ...).
        draft=None takes the model's default draft when it has one; draft=False decodes without one.
        offload: stream the target's layers from host RAM (None: only when it does not fit `gpu_memory`).
        gpu_memory: the device budget ("20GiB"); default: the GPU's free memory (none on the CPU).
        host_memory: what the host store may take ("20GiB"); streamed layers beyond it (after the disk tier's
        `prefetch` staging buffers) are read from the disk store every sweep with direct I/O. Default: no cap
        (OFFLOAD_RUNTIME_MAX_HOST_MEMORY stays the machine-wide ceiling either way).
        offload_dir: where the disk store is written once from the checkpoint (default: under the runtime home);
        given, the store also serves the host layers, mapped shared, so processes on one machine share them.
        prefetch / read_threads: staging buffers and reader threads of the disk tier (default: the plan's, else 2
        and 4). `engine.residency` tells where each layer lives (.resident, .host, .disk).
        tree: "auto" (default) follows the plans: each regime's plan says whether Sequoia's static tree or trees grown
        per step from the draft's probabilities are faster here (static without a plan); "static" takes the planned
        static tree; "dynamic" grows each step's tree (spec/growth.py) with the plan's budget and calibration, or the
        device's default budget keyed by the draft's own probabilities; a parent array (or Tree, or DynamicTree) is
        used by every request, overriding the plans.
        tree_size / tree_depth: the budget (nodes, root included; depth limit) of "static" / "dynamic" / "auto" trees,
        overriding the plan's (a static tree of another size is the best one for the plan's acceptance vector).
        plan: "auto" uses the planner's plans for this machine and model pair, each request the one made for its
        sampling settings (one line on stderr says which, or that none matched and the default tree is used);
        a path uses that plan file; None skips plans.
        quantize: "int8" or "int4" quantizes the target's decoder linears as they are read (group-wise with a zero
        point, `group_size` columns per group, 128 by default, -1 per channel); draft_quantize does the same for
        the draft. AWQ and GPTQ checkpoints are detected from config.json and used as they are. cache_quantized
        keeps the packed linears in the runtime's home (one file per layer, about a quarter of the checkpoint
        at int4) and reloads read them instead of quantizing again.
        """
        from .loading import load

        return load(cls, model, **options)

    # --- introspection

    @property
    def offloaded(self) -> bool:
        return isinstance(self.target.layers, StreamedLayers)

    @property
    def tokenizer(self) -> Any:
        return self.codec.tokenizer

    def sweep_stats(self) -> list[SweepStats]:
        """Per-sweep bytes, time, GB/s and copy waits of the streamed target (empty when nothing streams)."""
        return self.target.layers.resolve_stats() if self.offloaded else []

    def tree_for(self, params: SamplingParams, mode: str | None = None) -> TreeSpec:
        """The tree (or growth policy) a request with these settings gets: in `mode` ("auto", "static", "dynamic";
        None: the engine's)."""
        return self.trees.tree_for(params.temperature, params.top_p, mode)

    # --- text

    def encode(self, prompt: Prompt) -> list[int]:
        return self.codec.encode(prompt)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.codec.apply_chat_template(messages)

    def decode(self, ids: Sequence[int]) -> str | None:
        return self.codec.decode(ids)

    # --- requests

    def sampling_params(self, temperature: float | None = None, top_p: float | None = None,
                        max_new_tokens: int | None = None, ignore_eos: bool = False,
                        seed: int | None = None) -> SamplingParams:
        return self.defaults.sampling(temperature, top_p, max_new_tokens, ignore_eos, seed)

    def _check_length(self, ids: list[int]) -> None:
        if len(ids) + 1 > self.max_seq_len:
            more = " or raise max_seq_len" if self.max_seq_len < self.target.args.max_position_embeddings else ""
            raise ContextLengthError(f"the prompt has {len(ids)} tokens but the context window holds "
                                     f"{self.max_seq_len} (a prompt of at most {self.max_seq_len - 1}, to leave room "
                                     f"for a reply); shorten the prompt{more}")

    def _prepare(self, req: Request, params: SamplingParams, tree: TreeOption) -> None:
        req.params = params
        if tree is None or self.draft is None:
            req.tree = self.tree_for(params)
        elif isinstance(tree, str):
            req.tree = self.tree_for(params, tree_option(tree)[0])
        else:
            req.tree = tree if isinstance(tree, DynamicTree) else _as_tree(tree)
        req.rng = make_generator(params.seed)
        req.draft_rng = make_generator(params.seed + 1, self.draft.device if self.draft else "cpu")

    def new_request(self, ids: list[int], *, tree: TreeOption = None,
                    **sampling: Any) -> Request:
        """A request for prompt token ids, with sampling settings (defaults from generation_config.json)."""
        self._check_length(ids)
        params = self.sampling_params(**sampling)
        req = Request(tokens=list(ids), params=params, eos_ids=self.eos_ids)
        self._prepare(req, params, tree)
        return req

    def renew_request(self, req: Request, ids: list[int], *, tree: TreeOption = None,
                      **sampling: Any) -> None:
        """The next turn of a conversation on the same request (its cached prefix is kept)."""
        params = self.sampling_params(**sampling)
        req.reset_tokens(ids)
        self._prepare(req, params, tree)

    def request(self, prompt: Prompt | None = None, *, messages: Sequence[dict[str, str]] | None = None,
                max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                seed: int | None = None, ignore_eos: bool = False, stop: Sequence[str] | str = (),
                tree: TreeOption = None) -> Request:
        """A request for `run`: a prompt (text or token ids) or chat messages, with its own sampling settings,
        stop strings and (optionally) its own tree."""
        if (prompt is None) == (messages is None):
            raise UsageError("give either a prompt or chat messages")
        ids = self.codec.encode(prompt) if messages is None else self.codec.apply_chat_template(messages)
        stop = normalise_stop(stop)
        stream = self.codec.stream(stop) if stop else None
        req = self.new_request(ids, tree=tree, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               seed=seed, ignore_eos=ignore_eos)
        if stream is not None:
            watch(req, stream)
            self._streams[req] = stream
        return req

    # --- running

    def _result(self, req: Request) -> GenerationResult:
        text = self.codec.decode(req.generated)
        stream = self._streams.get(req)
        if text is not None and stream is not None:
            cuts = [text.find(s) for s in stream.stop if s in text]
            text = text[: min(cuts)] if cuts else text
        return GenerationResult(text, list(req.generated), list(req.tokens[: req.n_prompt]),
                                req.finish_reason or "interrupted", req.stats, req.error)

    def begin_call(self) -> CallMark:
        """Where the decoder's running totals stand before a call (see finish_call)."""
        self.decoder.clock.resolve(block=True)
        return CallMark(dataclasses.replace(self.decoder.times), len(self.sweep_stats()))

    def finish_call(self, requests: Sequence[Request], mark: CallMark) -> CallStats:
        """Resolve the call's timings (waiting for the device only now) and record its statistics."""
        self.decoder.clock.resolve(block=True)
        t, t0 = self.decoder.times, mark.times
        call = CallStats(steps=t.steps - t0.steps, draft_s=t.draft_s - t0.draft_s, sweep_s=t.sweep_s - t0.sweep_s,
                         host_s=t.host_s - t0.host_s, new_tokens=sum(len(r.generated) for r in requests),
                         sweeps=self.sweep_stats()[mark.sweeps:])
        self.last_stats = [r.stats for r in requests]
        self.last_call = call
        return call

    def run(self, requests: Sequence[Request]) -> Iterator[tuple[int, GenerationResult]]:
        """Decode requests up to batch_size at a time; yields (index, result) as each one finishes.

        A request whose decoding raised is yielded with finish_reason "error" and the exception in `error`;
        the others run on (decode/scheduler.py)."""
        index = {id(r): i for i, r in enumerate(requests)}
        mark = self.begin_call()
        for finished in self.scheduler.run(list(requests)):
            for req in finished:
                yield index[id(req)], self._result(req)
        self.finish_call(list(requests), mark)

    def generate(self, prompts: Prompt | Sequence[Prompt], *, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | Sequence[int] | None = None,
                 ignore_eos: bool = False, stop: Sequence[str] | str = (),
                 tree: TreeOption = None) -> Generations:
        """One GenerationResult per prompt. A prompt is a string or a list of token ids.

        With several prompts and one seed, prompt i uses seed + i (so it gives the tokens it gives alone with
        that seed); a list of seeds gives one per prompt. `tree` overrides the planned tree for this call: a tree, a
        DynamicTree, or a mode ("static", "dynamic", "auto").
        """
        batch = _as_prompt_list(prompts)
        if isinstance(seed, (list, tuple)):
            if len(seed) != len(batch):
                raise UsageError(f"got {len(seed)} seeds for {len(batch)} prompts")
            seeds = [check_seed(s) for s in seed]
        else:
            base = int.from_bytes(os.urandom(4), "little") if seed is None else check_seed(seed)
            seeds = [base + i for i in range(len(batch))]
        requests = [self.request(p, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=s,
                                 ignore_eos=ignore_eos, stop=stop, tree=tree) for p, s in zip(batch, seeds)]
        results: list[GenerationResult | None] = [None] * len(requests)
        for i, result in self.run(requests):
            results[i] = result
        failed = next((r.error for r in results if r.error is not None), None)
        if failed is not None:
            raise failed
        out = Generations(results)
        out.stats = self.last_call
        return out

    def chat(self, messages: Sequence[dict[str, str]], **kwargs: Any) -> GenerationResult:
        """Generate the assistant's reply to chat-formatted messages."""
        return self.generate([self.codec.apply_chat_template(messages)], **kwargs)[0]

    def stream(self, prompt: Prompt, **kwargs: Any) -> Iterator[str]:
        """Yield the reply's text piece by piece as tokens are accepted."""
        yield from self.session().stream_ids(self.codec.encode(prompt), **kwargs)

    def session(self) -> ChatSession:
        return ChatSession(self)


def _as_tree(tree: Tree | Sequence[int]) -> Tree:
    try:
        return Tree.of(tree)
    except (ValueError, TypeError) as e:
        raise UsageError(f"invalid tree: {e}") from None


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise UsageError(f"prompts must be a string, a list of token ids, or a list of either; got "
                         f"{type(prompts).__name__}")
    if not prompts:
        raise UsageError("no prompts given")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [list(prompts)]
    return list(prompts)
