"""The runtime's exactness claims, on CUDA: run on a GPU by tools/device_check.py
(`python -m pytest -m gpu tests/test_gpu.py`); deselected elsewhere, and skipped where CUDA is absent.

- Streamed and resident forwards give bitwise-identical logits and greedy tokens (K = 2, 3 slots; none, some or
  all layers resident; float16 and bfloat16): the same weights, the same kernels, only where the bytes live differs.
- Greedy speculative decoding gives greedy plain decoding's tokens (chain, bushy and planner-shaped trees; the
  draft a truncated copy of the target, so trees are really accepted).
- A batch gives every sequence what it gets alone.

In 16-bit, plain decoding (1-token forwards) and a tree sweep (n-token forwards) run different kernels, so their
roundings differ and a near-tie between the target's two best tokens may fall either way: both tokens are the
target's greedy choice within its own precision. `assert_same_greedy` therefore allows a divergence only where
the two tokens' float32 logits are closer than 4x the dtype's own logit error at that context (measured there),
and carries on from the divergence. A wrong verifier accepts tokens the target ranks well below its best (gaps
of the order of the logits' spread, far above the rounding) and fails. In float32 both reference engines are the
same computation (error 0), so the allowance is 1e-6: the comparison is exact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pytest
import torch

from helpers import make_checkpoint
from offload_runtime import Engine
from offload_runtime.model.batch import RowChunk, build_forward
from offload_runtime.model.kv_cache import KVCache
from offload_runtime.model.tree import Tree
from offload_runtime.spec.tree_search import DEFAULT_ACCEPTANCE, best_first_tree

pytestmark = pytest.mark.gpu

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
IDS = [3, 17, 44, 9, 81, 5, 60]
TREES = {
    "chain": [-1, 0, 1, 2, 3, 4],
    "bushy": [-1, 0, 0, 0, 1, 1, 2, 4, 4, 7],
    "planned-32": best_first_tree(DEFAULT_ACCEPTANCE, 32, 8)[1],
}
TIE_FACTOR = 4.0  # a divergence must sit within 4x the dtype's measured logit error (see the module docstring)


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available (tools/device_check.py runs these on a GPU)")
    return torch.device("cuda")


def load(path: Path, dtype: str, **kw) -> Engine:
    kw.setdefault("draft", False)
    return Engine.from_pretrained(path, device="cuda", dtype=dtype, progress=False, quiet=True, **kw)


def last_logits(engine: Engine, ids: Sequence[int]) -> torch.Tensor:
    """The target's next-token logits after `ids` from one chain forward (float32, on the host)."""
    n = len(ids)
    cache = KVCache(engine.target.args, 1, n + 1, engine.target.dtype, engine.target.device)
    batch = build_forward([RowChunk(0, Tree.chain(n), list(ids), range(n), [n - 1])], cache.scratch_slot,
                          engine.target.args.sliding_window, engine.target.device)
    return engine.target.forward(batch, cache)[0, 0].float().cpu()


def chain_logits(engine: Engine, ids: Sequence[int]) -> torch.Tensor:
    n = len(ids)
    cache = KVCache(engine.target.args, 1, 64, engine.target.dtype, engine.target.device)
    batch = build_forward([RowChunk(0, Tree.chain(n), list(ids), range(n), range(n))], cache.scratch_slot,
                          engine.target.args.sliding_window, engine.target.device)
    return engine.target.forward(batch, cache)


def greedy(engine: Engine, ids: Sequence[int], n: int) -> tuple[list[int], int]:
    """n greedy tokens after ids, and how many drafted tokens the target accepted on the way."""
    r = engine.generate(list(ids), max_new_tokens=n, temperature=0, ignore_eos=True)[0]
    return r.token_ids, sum(r.stats.accepted_per_step)


class Judge:
    """Says whether two tokens are a near-tie of the target after a context, at a dtype's precision."""

    def __init__(self, path: Path, dtype: str):
        self.exact = load(path, "float32")  # the checkpoint's 16-bit weights, upcast exactly
        self.low = load(path, dtype)

    def gap_and_error(self, ids: Sequence[int], a: int, b: int) -> tuple[float, float]:
        ref = last_logits(self.exact, ids)
        err = float((last_logits(self.low, ids) - ref).abs().max())
        return abs(float(ref[a] - ref[b])), err


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    assert len(a) == len(b), (len(a), len(b))
    return None


def assert_tie(judge: Judge, context: Sequence[int], a: int, b: int, where: str) -> None:
    gap, err = judge.gap_and_error(context, a, b)
    assert gap <= TIE_FACTOR * err + 1e-6, (
        f"{where}: tokens {a} and {b} differ after {len(context)} tokens, but the target's float32 logits of the two "
        f"differ by {gap:.4g}, more than {TIE_FACTOR:g}x this dtype's logit error there ({err:.3g})")


def assert_same_greedy(want: Engine, got: Engine, judge: Judge, prompt: Sequence[int], n: int) -> int:
    """`got` greedy-decodes what `want` does, up to near-ties (each one judged, then both carry on from `want`'s
    token). Returns the drafted tokens `got` had accepted."""
    ids, left, ties, accepted = list(prompt), n, 0, 0
    while left > 0:
        a, _ = greedy(want, ids, left)
        b, acc = greedy(got, ids, left)
        j = first_divergence(a, b)
        accepted += acc
        if j is None:
            return accepted
        assert_tie(judge, ids + a[:j], a[j], b[j], "greedy")
        ties += 1
        assert ties <= max(1, n // 8), f"{ties} near-ties in {n} tokens: more than rounding explains"
        ids, left = ids + a[: j + 1], left - j - 1
    return accepted


# --- checkpoints (built after the CUDA check, so nothing is made on a machine without a GPU)


@pytest.fixture(scope="module")
def deep(cuda, tmp_path_factory) -> dict[str, Path]:
    """Six GQA layers with llama3 rope, saved in each 16-bit dtype."""
    root = tmp_path_factory.mktemp("gpu-deep")
    return {name: make_checkpoint(root / name, "llama-gqa-llama3", num_hidden_layers=6, seed=3, dtype=DTYPES[name])
            for name in ("float16", "bfloat16")}


@pytest.fixture(scope="module")
def pairs(cuda, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """A 4-layer target per dtype and a draft that is its first 2 layers (same embeddings and head)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("gpu-pairs")
    out = {}
    for name, dt in DTYPES.items():
        target = make_checkpoint(root / name / "target", "llama-mha", seed=11, num_hidden_layers=4, dtype=dt)
        draft = make_checkpoint(root / name / "draft", "llama-mha", seed=12, num_hidden_layers=2, dtype=dt)
        weights = load_file(target / "model.safetensors")
        kept = {k: v for k, v in weights.items()
                if not k.startswith("model.layers.") or int(k.split(".")[2]) < 2}
        save_file(kept, draft / "model.safetensors", metadata={"format": "pt"})
        out[name] = (target, draft)
    return out


# --- streamed == resident, bitwise


@pytest.fixture(scope="module")
def resident_reference(deep) -> dict[str, tuple[torch.Tensor, list[int]]]:
    out = {}
    for name, path in deep.items():
        base = load(path, name, offload=False)
        assert not base.offloaded
        out[name] = (chain_logits(base, IDS), greedy(base, IDS, 12)[0])
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("slots", [2, 3])
@pytest.mark.parametrize("resident", [0, 2, 6])
def test_streamed_equals_resident_bitwise_on_cuda(deep, resident_reference, dtype, slots, resident):
    engine = load(deep[dtype], dtype, offload=True, slots=slots, resident_layers=resident)
    assert engine.offloaded and len(engine.residency.resident) == resident
    layers = engine.target.layers
    if resident < 6:
        assert layers.store.pinned, "CUDA streaming must copy from pinned host memory"
    want_logits, want_tokens = resident_reference[dtype]
    got_logits = chain_logits(engine, IDS)
    assert torch.isfinite(got_logits).all()
    assert torch.equal(got_logits, want_logits)
    assert greedy(engine, IDS, 12)[0] == want_tokens
    sweeps = engine.sweep_stats()  # CUDA events turned into seconds
    assert len(sweeps) == 13 and all(s.layers == 6 - resident for s in sweeps)
    assert all(s.wall_s > 0 and s.wait_s >= 0 for s in sweeps)
    if 6 - resident > slots:  # every streamed layer really moves, every sweep
        assert all(s.bytes == (6 - resident) * layers.store.layer_bytes for s in sweeps)


# --- greedy speculative == greedy plain


@pytest.fixture(scope="module")
def judges(pairs) -> dict[str, Judge]:
    return {name: Judge(target, name) for name, (target, _) in pairs.items()}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tree", list(TREES))
def test_greedy_speculative_equals_plain_on_cuda(pairs, judges, dtype, tree):
    target, draft = pairs[dtype]
    plain = judges[dtype].low if dtype != "float32" else judges[dtype].exact
    spec = load(target, dtype, draft=str(draft), tree=TREES[tree])
    accepted = assert_same_greedy(plain, spec, judges[dtype], [5, 9, 14, 3, 77, 21, 8, 40], 48)
    assert accepted > 0, "the draft never had a token accepted: this run checked plain decoding only"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_greedy_speculative_with_streaming_equals_plain_on_cuda(pairs, judges, dtype):
    target, draft = pairs[dtype]
    spec = load(target, dtype, draft=str(draft), tree=TREES["bushy"], offload=True, resident_layers=1)
    assert spec.offloaded
    accepted = assert_same_greedy(judges[dtype].low, spec, judges[dtype], [7, 7, 31, 2, 90, 64], 40)
    assert accepted > 0


# --- batch == alone

PROMPTS = [[5, 9, 14], list(range(3, 30)), [7], [40, 41, 42, 43, 44, 45, 46], [11, 3] * 6, [99, 98, 97, 96]]
MAX_NEW = [20, 7, 33, 12, 25, 3]  # sequences finish at different steps; others take their rows


def run_all(engine: Engine, greedy_: bool) -> list[list[int]]:
    kw = dict(temperature=0) if greedy_ else dict(temperature=0.9, top_p=0.95)
    reqs = [engine.request(p, max_new_tokens=m, ignore_eos=True, seed=100 + i, **kw)
            for i, (p, m) in enumerate(zip(PROMPTS, MAX_NEW))]
    out: list[list[int]] = [[] for _ in reqs]
    for i, result in engine.run(reqs):
        out[i] = result.token_ids
    return out


@pytest.mark.parametrize("greedy_", [True, False], ids=["greedy", "sampled"])
def test_batch_equals_alone_on_cuda_float32(pairs, greedy_):
    """float32: rounding differences between batched and single rows cannot flip a choice (ties ~1e-7 apart)."""
    target, draft = pairs["float32"]
    tree = [-1, 0, 0, 1, 1, 2, 3]
    alone = load(target, "float32", draft=str(draft), tree=tree)
    batched = load(target, "float32", draft=str(draft), tree=tree, batch_size=4, offload=True, resident_layers=1)
    want, got = run_all(alone, greedy_), run_all(batched, greedy_)
    assert got == want
    assert [len(t) for t in got] == MAX_NEW


def test_greedy_batch_equals_alone_on_cuda_bfloat16(pairs, judges):
    """bfloat16: each sequence matches its solo run up to its first divergence, which must be a near-tie."""
    target, draft = pairs["bfloat16"]
    tree = [-1, 0, 0, 1, 1, 2, 3]
    alone = load(target, "bfloat16", draft=str(draft), tree=tree)
    batched = load(target, "bfloat16", draft=str(draft), tree=tree, batch_size=4, offload=True, resident_layers=1)
    want, got = run_all(alone, True), run_all(batched, True)
    assert [len(t) for t in got] == MAX_NEW
    for prompt, a, b in zip(PROMPTS, want, got):
        j = first_divergence(a, b)
        if j is not None:
            assert_tie(judges["bfloat16"], prompt + a[:j], a[j], b[j], "batch")
