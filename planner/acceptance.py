"""Measure the acceptance vector p[1..W] of a model pair, as Sequoia does.

Every step drafts a one-level tree: W children of the root, drawn from the draft without replacement
(Gumbel-top-k; the draft's top W when greedy), and the target verifies it. Under Sequoia's positional
assumption p[k] is the probability that the k-th child is the accepted one, so the histogram of accepted
ranks over many steps estimates it: p[k] ~ count(k) / steps, with standard error sqrt(p (1 - p) / steps)
(each step is one draw of a categorical over {1..W, none}; steps of one sequence are treated as
independent, which they nearly are but not exactly).

The runtime does the drafting and verifying (Engine with tree [-1, 0, 0, ..., 0]), so the measurement uses
exactly the sampling, warping and verification code that plans will run with.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from offload_runtime.api.home import short_hash, store_dir, write_json
from offload_runtime.api.plans import ModelRef
from offload_runtime.errors import ContextLengthError, UsageError
from offload_runtime.spec.growth import ConfidenceAcceptance

# A small, varied prompt set: narrative, instructions, code, facts, dialogue, lists. Short on purpose: the
# measurement wants many decoding steps in varied contexts, not long prefills.
BUILTIN_PROMPTS: tuple[str, ...] = (
    "Once upon a time, in a village at the edge of a great forest,",
    "The best way to learn a new language is",
    "Write a short poem about the sea at night.",
    "Explain how a refrigerator keeps food cold.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The capital of France is Paris. The capital of Italy is",
    "Here is a recipe for a simple tomato soup:",
    "Dear hiring manager, I am writing to apply for",
    "The three most important events of the twentieth century were",
    "In the beginning God created the heaven and the earth. And the earth was",
    "Q: What causes the seasons on Earth?\nA:",
    "List five things to pack for a weekend hiking trip:\n1.",
    "The old man looked at the letter for a long time before he",
    "To install the package, open a terminal and type",
    "Photosynthesis is the process by which plants",
    "She opened the door and saw that the room was",
    "A good night's sleep matters because",
    "The following is a conversation between a customer and a shop assistant.\nCustomer:",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "SELECT name, age FROM users WHERE",
    "The train left the station at dawn, carrying",
    "Why is the sky blue? The short answer is that",
    "My favourite season is autumn, because",
    "The meeting has been moved to Thursday. Please",
    "In mathematics, a prime number is",
    "Translate into French: The cat is sleeping on the chair.",
    "He had never seen so many stars. Far from the city lights,",
    "Tips for writing clear documentation:",
    "The history of the printing press begins",
    "for i in range(10):\n    if i % 2 == 0:\n",
    "It was the last day of summer, and the children",
    "A balanced breakfast usually includes",
)


@dataclass
class AcceptanceResult:
    p: list[float]  # p[k - 1] = P(the k-th child is accepted)
    se: list[float]  # standard error of each entry
    counts: list[int]  # steps whose accepted child had rank k
    none: int  # steps where no child was accepted
    steps: int  # steps counted (each had the full W children)
    width: int
    temperature: float
    top_p: float
    target: ModelRef
    draft: ModelRef
    prompts: dict[str, Any]  # source, count, sha
    max_new_tokens: int
    seed: int
    device: str
    dtype: str
    tokens_per_step: float  # of the one-level tree: 1 + sum(p)
    elapsed_s: float = 0.0
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    # p by the draft's confidence at the root (spec/growth.py ConfidenceAcceptance.to_dict): what dynamic trees are
    # keyed by. None in files measured before it was recorded.
    confidence: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "acceptance", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AcceptanceResult":
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data or k != "confidence"}
        fields["target"] = ModelRef(**data["target"])
        fields["draft"] = ModelRef(**data["draft"])
        return cls(**fields)


# --- counting


def count_ranks(accepted_ranks: Sequence[tuple[int, ...]], accepted_per_step: Sequence[int], max_new_tokens: int,
                width: int) -> tuple[list[int], int, int]:
    """(counts per rank, steps with no child accepted, steps counted) for one sequence's steps.

    The engine drafts a one-node tree (nothing to accept) on a step that starts with one token or less left
    to generate (Decoder.step); those steps are left out, or they would count as rejections. The tokens
    generated before each step are rebuilt from accepted_per_step (path length, without the bonus token).
    """
    assert len(accepted_ranks) == len(accepted_per_step)
    counts = [0] * width
    none = steps = 0
    generated = 0
    for ranks, accepted in zip(accepted_ranks, accepted_per_step):
        full_tree = max_new_tokens - generated > 1
        generated += accepted + 1
        if not full_tree:
            continue
        assert len(ranks) <= 1, f"a one-level tree accepts at most one node, got ranks {ranks}"
        steps += 1
        if ranks:
            assert 1 <= ranks[0] <= width, ranks
            counts[ranks[0] - 1] += 1
        else:
            none += 1
    return counts, none, steps


def confidence_pairs(confidence: Sequence[float], accepted_ranks: Sequence[tuple[int, ...]],
                     accepted_per_step: Sequence[int], max_new_tokens: int) -> list[tuple[float, int]]:
    """(the draft's top probability at the root, accepted rank or 0) for each step count_ranks counts.

    The decoder records a confidence on every step that drafts a tree, which are exactly the steps counted."""
    out, generated = [], 0
    for ranks, accepted in zip(accepted_ranks, accepted_per_step):
        if max_new_tokens - generated > 1:
            out.append(ranks[0] if ranks else 0)
        generated += accepted + 1
    assert len(out) == len(confidence), (len(out), len(confidence))
    return list(zip(confidence, out))


def estimate(counts: Sequence[int], steps: int) -> tuple[list[float], list[float]]:
    """p[k] = count(k) / steps and its binomial standard error."""
    if steps == 0:
        raise UsageError("no decoding steps were measured; give more prompts or a larger --max-new-tokens")
    p = [c / steps for c in counts]
    se = [math.sqrt(max(q * (1 - q), 0.0) / steps) for q in p]
    return p, se


# --- prompts


def read_prompts(path: str | Path) -> list[str | list[int]]:
    """JSONL: one {"prompt": "text" | [token ids]} (or {"text": ...}) per line; blank lines skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UsageError(f"cannot read prompts file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"prompts file {path} is not UTF-8 text") from None
    prompts: list[str | list[int]] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{path}:{i}: not valid JSON; each line must be {{\"prompt\": \"...\"}}") from None
        value = rec.get("prompt", rec.get("text")) if isinstance(rec, dict) else rec if isinstance(rec, str) else None
        ok = isinstance(value, str) and value.strip() or (
            isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value))
        if not ok:
            raise UsageError(f"{path}:{i}: needs a non-empty \"prompt\" (text or a list of token ids)")
        prompts.append(value)
    if not prompts:
        raise UsageError(f"prompts file {path} holds no prompts")
    return prompts


def prompts_sha(prompts: Sequence[str | list[int]]) -> str:
    return short_hash(list(prompts))


# --- the measurement


def acceptance_path(target: ModelRef, draft: ModelRef, temperature: float, top_p: float, width: int,
                    prompts_sha: str, formats: tuple[str | None, str | None] = (None, None)) -> Path:
    """Keyed by both models' files, the sampling settings, the star's width, the prompts and (when either model is
    quantized) their packed formats: a quantized pair agrees differently."""
    key = {"target": target.fingerprint, "draft": draft.fingerprint, "temperature": round(temperature, 6),
           "top_p": round(top_p, 6), "width": width, "prompts": prompts_sha}
    if formats != (None, None):
        key["formats"] = list(formats)
    return store_dir("acceptance") / f"{short_hash(key)}.json"


def measure_acceptance(target: ModelRef, draft: ModelRef, *, device: str | torch.device | None = None,
                       dtype: str | torch.dtype | None = None, temperature: float = 0.6, top_p: float = 1.0,
                       width: int = 16, prompts: Sequence[str | list[int]] | None = None,
                       prompts_source: str = "built-in", max_new_tokens: int = 64, seed: int = 0,
                       batch_size: int = 8, progress: bool = False,
                       log: Callable[[str], None] = lambda s: None,
                       engine_options: dict[str, Any] | None = None) -> AcceptanceResult:
    """Run the pair on `prompts` with one-level trees of `width` children and count the accepted ranks.

    Up to `batch_size` prompts share each target sweep (rows are independent, so the counts are the same as one
    by one; offloaded, it is many times faster). `engine_options` go to Engine.from_pretrained (quantize=, ...).
    """
    from offload_runtime.api.engine import Engine
    from offload_runtime.api.options import check_sampling
    from offload_runtime.api.text import load_tokenizer
    from offload_runtime.weights.gguf import model_args

    if target.is_preset or draft.is_preset:
        raise UsageError("measuring acceptance needs the weights of both models; "
                         f"{target.name if target.is_preset else draft.name} is only a shape preset here")
    if not isinstance(width, int) or width < 1:
        raise UsageError(f"--width must be a whole number >= 1, got {width}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch-size must be a whole number >= 1, got {batch_size}")
    check_sampling(temperature, top_p, max_new_tokens)
    t0 = time.perf_counter()
    args = model_args(target.path)
    tokenizer = load_tokenizer(target.path)
    if prompts is None:
        if tokenizer is not None:
            prompts = list(BUILTIN_PROMPTS)
        else:
            log(f"{target.name} ships no tokenizer; using random token-id prompts")
            g = torch.Generator().manual_seed(seed)
            prompts = [torch.randint(3, args.vocab_size, (12,), generator=g).tolist()
                       for _ in range(len(BUILTIN_PROMPTS))]
            prompts_source = "random token ids"
    if tokenizer is None and any(isinstance(pr, str) for pr in prompts):
        raise UsageError(f"{target.name} ships no tokenizer, so prompts must be lists of token ids")
    ids = [list(tokenizer(pr).input_ids) if isinstance(pr, str) else list(pr) for pr in prompts]
    # Room for the prompt, the reply and the tree in the context window: keep each prompt's last tokens. The
    # window allocated is only as long as the longest prompt needs (B KV caches of it).
    limit = args.max_position_embeddings
    room = limit - max_new_tokens - width - 2
    if room < 1:
        raise ContextLengthError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the context window "
                                 f"of {limit}; lower it")
    ids = [x[-room:] for x in ids]
    max_seq_len = max(len(x) for x in ids) + max_new_tokens + width + 2
    engine = Engine.from_pretrained(target.path, draft=draft.loads_as, device=device, dtype=dtype,
                                    tree=[-1] + [0] * width, plan=None, max_seq_len=max_seq_len,
                                    batch_size=min(batch_size, len(ids)), progress=progress,
                                    **(engine_options or {}))
    requests = [engine.request(x, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               seed=seed + i, ignore_eos=True) for i, x in enumerate(ids)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc="measuring acceptance", unit="prompt", leave=False, file=sys.stderr)
    counts = [0] * width
    none = steps = 0
    pairs: list[tuple[float, int]] = []
    try:
        for _, result in engine.run(requests):
            st = result.stats
            c, n0, s = count_ranks(st.accepted_ranks, st.accepted_per_step, max_new_tokens, width)
            counts = [a + b for a, b in zip(counts, c)]
            none += n0
            steps += s
            pairs += confidence_pairs(st.root_confidence, st.accepted_ranks, st.accepted_per_step, max_new_tokens)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    p, se = estimate(counts, steps)
    conf = ConfidenceAcceptance.from_counts([c for c, _ in pairs], [r for _, r in pairs], width)
    return AcceptanceResult(
        p=p, se=se, counts=counts, none=none, steps=steps, width=width, temperature=float(temperature),
        top_p=float(top_p), target=target, draft=draft,
        prompts={"source": prompts_source, "count": len(prompts), "sha": prompts_sha(prompts)},
        max_new_tokens=max_new_tokens, seed=seed, device=engine.target.device.type,
        dtype=str(engine.target.dtype).replace("torch.", ""), tokens_per_step=1.0 + sum(p),
        elapsed_s=time.perf_counter() - t0, confidence=conf.to_dict())


def save_acceptance(result: AcceptanceResult, path: Path | None = None) -> Path:
    path = path or acceptance_path(result.target, result.draft, result.temperature, result.top_p, result.width,
                                   result.prompts["sha"])
    return write_json(path, result.to_dict())


def read_acceptance(path: str | Path) -> AcceptanceResult:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("kind") != "acceptance":
            raise KeyError("kind")
        return AcceptanceResult.from_dict(data)
    except OSError as e:
        raise UsageError(f"cannot read acceptance file {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UsageError(f"{path} is not an acceptance measurement; run `python -m planner acceptance`") from None


def parse_vector(text: str) -> list[float]:
    """'0.7,0.1,0.05' -> [0.7, 0.1, 0.05], each in [0, 1], sum <= 1 (disjoint events)."""
    try:
        p = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"cannot read acceptance vector {text!r}; write it like 0.7,0.1,0.05") from None
    if not p or any(not 0 <= x <= 1 for x in p) or sum(p) > 1 + 1e-9:
        raise UsageError(f"an acceptance vector needs entries in [0, 1] summing to at most 1, got {p}")
    return p
