"""The model core against transformers: prefill, incremental decoding, tree attention, KV compaction."""
import pytest
import torch

from helpers import CONFIGS, reference_model
from offload_runtime.weights.checkpoint import Checkpoint
from offload_runtime.model.batch import RowChunk, build_forward
from offload_runtime.model.kv_cache import KVCache
from offload_runtime.model.transformer import ResidentLayers, Transformer
from offload_runtime.model.tree import Tree
from offload_runtime.weights.loader import load_globals, load_layer

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def ours(path, dtype):
    ck = Checkpoint(path)
    ck.validate()
    dev = torch.device("cpu")
    layers = ResidentLayers([load_layer(ck, i, dtype, dev) for i in range(ck.args.n_layers)])
    return Transformer(ck.args, load_globals(ck, dtype, dev), layers, dev)


def path_to(tree: Tree, node: int) -> list[int]:
    """Root-to-node path, root included."""
    path = [node]
    while tree.parents[path[-1]] >= 0:
        path.append(tree.parents[path[-1]])
    return path[::-1]


def run(model, cache, length, tree, tokens, row=0):
    chunk = RowChunk(length, tree, tokens, range(len(tree)), range(len(tree)))
    rows = [None] * cache.batch
    rows[row] = chunk
    batch = build_forward(rows, cache.scratch_slot, model.args.sliding_window, "cpu")
    return model.forward(batch, cache)[row]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def ref_logits(ref, ids):
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_incremental_match_transformers(checkpoints, name, dtype):
    path = checkpoints[name]
    model, ref = ours(path, dtype), reference_model(path, dtype)
    vocab = model.args.vocab_size
    ids = torch.randint(0, vocab, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = ref_logits(ref, ids)
    assert expected.abs().max() > 0.1  # logits that carry signal, so the comparison means something
    cache = KVCache(model.args, 1, 64, dtype, "cpu")
    got = run(model, cache, 0, Tree.chain(25), ids[:25])
    assert rel_err(got, expected[:25]) < TOL[dtype]
    # Then one token at a time on top of the cached prefix.
    length = cache.keep(0, 0, range(25))
    for t in range(25, 40):
        step = run(model, cache, length, Tree([-1]), [ids[t]])
        assert rel_err(step[0], expected[t]) < TOL[dtype], t
        length = cache.keep(0, length, [0])


def random_tree(n, gen):
    parents = [-1]
    for i in range(1, n):
        # a parent among the deepest two levels keeps breadth-first order valid
        depth = Tree(parents).depth
        top = depth[-1]
        candidates = [j for j in range(i) if depth[j] >= top - 1]
        parents.append(candidates[int(torch.randint(len(candidates), (1,), generator=gen))])
        try:
            Tree(parents)
        except ValueError:
            parents[-1] = i - 1
    return Tree(parents)


def _cuda_like_sdpa(monkeypatch) -> None:
    """Make SDPA return its output the way CUDA's memory-efficient kernel does: [B, T, H, Dh] memory seen as
    [B, H, T, Dh] (not contiguous), so layout assumptions that only hold on the CPU fail here too."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def strided(*args, **kwargs):
        return sdpa(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", strided)


@pytest.mark.parametrize("fold", [False, True], ids=["grouped", "folded"])
@pytest.mark.parametrize("name", ["llama-gqa-llama3", "qwen2-bias", "llama-tied-bias-linear"])
def test_tree_forward_equals_sequential_paths(checkpoints, name, fold, monkeypatch):
    """Folded: grouped-query attention as CUDA runs it (model.layer_mask, and SDPA's strided output)."""
    path = checkpoints[name]
    dtype = torch.float64
    model, ref = ours(path, dtype), reference_model(path, dtype)
    assert model.fold_groups and model.args.n_kv_heads < model.args.n_heads  # grouped-query models fold by default
    model.fold_groups = fold
    if fold:
        _cuda_like_sdpa(monkeypatch)  # transformers runs under it too: only the layout changes, not values
    gen = torch.Generator().manual_seed(7)
    vocab = model.args.vocab_size
    prefix = torch.randint(0, vocab, (9,), generator=gen).tolist()
    tree = random_tree(14, gen)
    assert tree.max_depth >= 2 and any(len(k) >= 2 for k in tree.children)
    tokens = torch.randint(0, vocab, (len(tree),), generator=gen).tolist()
    cache = KVCache(model.args, 1, 64, dtype, "cpu")
    run(model, cache, 0, Tree.chain(len(prefix)), prefix)
    length = cache.keep(0, 0, range(len(prefix)))
    got = run(model, cache, length, tree, tokens)
    for node in range(len(tree)):
        seq = prefix + [tokens[u] for u in path_to(tree, node)]
        assert rel_err(got[node], ref_logits(ref, seq)[-1]) < TOL[dtype], node


@pytest.mark.parametrize("fold", [False, True], ids=["grouped", "folded"])
def test_tree_forward_in_a_batch_row_with_padding(checkpoints, fold):
    """A row's logits do not depend on what the other rows of the batch hold (padding, holes)."""
    path = checkpoints["llama-gqa-llama3"]
    dtype = torch.float64
    model = ours(path, dtype)
    model.fold_groups = fold
    gen = torch.Generator().manual_seed(9)
    tree = random_tree(10, gen)
    tokens = torch.randint(0, model.args.vocab_size, (len(tree),), generator=gen).tolist()
    alone = run(model, KVCache(model.args, 1, 32, dtype, "cpu"), 0, tree, tokens)
    cache = KVCache(model.args, 3, 32, dtype, "cpu")
    rows = [RowChunk(0, Tree.chain(20), list(range(20)), range(20), ()), None,
            RowChunk(0, tree, tokens, range(len(tree)), range(len(tree)))]
    batched = model.forward(build_forward(rows, cache.scratch_slot, None, "cpu"), cache)[2, : len(tree)]
    assert rel_err(batched, alone) < 1e-12


def test_keep_then_continue_equals_decoding_the_kept_path(checkpoints):
    path = checkpoints["llama-mha"]
    dtype = torch.float64
    model, ref = ours(path, dtype), reference_model(path, dtype)
    gen = torch.Generator().manual_seed(5)
    vocab = model.args.vocab_size
    prefix = torch.randint(0, vocab, (6,), generator=gen).tolist()
    tree = Tree([-1, 0, 0, 1, 1, 2, 3, 5, 6])
    tokens = torch.randint(0, vocab, (len(tree),), generator=gen).tolist()
    cache = KVCache(model.args, 1, 48, dtype, "cpu")
    run(model, cache, 0, Tree.chain(len(prefix)), prefix)
    length = cache.keep(0, 0, range(len(prefix)))
    run(model, cache, length, tree, tokens)
    kept = path_to(tree, 7)  # root -> 2 -> 5 -> 7: non-contiguous slots, so keep really moves K/V
    assert kept == [0, 2, 5, 7]
    length = cache.keep(0, length, kept)
    history = prefix + [tokens[u] for u in kept]
    for _ in range(5):
        nxt = int(torch.randint(0, vocab, (1,), generator=gen))
        got = run(model, cache, length, Tree([-1]), [nxt])[0]
        history.append(nxt)
        assert rel_err(got, ref_logits(ref, history)[-1]) < 1e-10
        length = cache.keep(0, length, [0])


def test_sliding_window_matches_mistral(tmp_path):
    from helpers import make_checkpoint

    path = make_checkpoint(tmp_path / "m", "mistral-gqa", sliding_window=8)
    model, ref = ours(path, torch.float64), reference_model(path, torch.float64)
    ids = torch.randint(0, model.args.vocab_size, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    cache = KVCache(model.args, 1, 64, torch.float64, "cpu")
    got = run(model, cache, 0, Tree.chain(30), ids)
    expected = ref_logits(ref, ids)
    assert rel_err(got, expected) < 1e-10



@pytest.mark.parametrize("layout", ["cpu", "cuda-like"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_folded_attention_equals_grouped_attention(dtype, layout, monkeypatch):
    """The folded layout (G query heads along the query axis, one additive mask per forward) against
    enable_gqa with the boolean mask, on random tensors and a random mask (every row sees slot 0, as
    build_forward guarantees)."""
    if layout == "cuda-like":
        _cuda_like_sdpa(monkeypatch)
    from offload_runtime.model.config import ModelArgs
    from offload_runtime.model.transformer import _attend, layer_mask

    args = ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=2, head_dim=8, vocab_size=16, intermediate_size=8)
    g = torch.Generator().manual_seed(5)
    B, T, S = 3, 7, 19
    q = torch.randn(B, args.n_heads, T, args.head_dim, generator=g, dtype=dtype)
    k, v = (torch.randn(B, args.n_kv_heads, S, args.head_dim, generator=g, dtype=dtype) for _ in range(2))
    mask = torch.rand(B, 1, T, S, generator=g) < 0.5
    mask[..., 0] = True
    want = _attend(q, k, v, layer_mask(args, mask, dtype, fold=False))
    folded = layer_mask(args, mask, dtype, fold=True)
    assert folded.shape == (B, 1, 4 * T, S) and folded.dtype == dtype and folded.stride(-2) % 16 == 0
    got = _attend(q, k, v, folded)
    assert got.shape == want.shape == (B, args.n_heads, T, args.head_dim)
    assert rel_err(got, want) < TOL[dtype]
    # a wrong grouping (query head h on K/V head h % H_kv instead of h // G) is caught by the same check
    wrong = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat(1, 4, 1, 1), v.repeat(1, 4, 1, 1), attn_mask=mask)
    assert rel_err(wrong, want) > 1e-2
    # multi-head models take the additive mask too (G = 1): the bits of SDPA's own conversion of the boolean mask
    mha = ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=8, head_dim=8, vocab_size=16, intermediate_size=8)
    additive = layer_mask(mha, mask, dtype)
    assert additive.shape == (B, 1, T, S) and additive.dtype == dtype
    k8, v8 = (torch.randn(B, mha.n_kv_heads, S, mha.head_dim, generator=g, dtype=dtype) for _ in range(2))
    assert torch.equal(_attend(q, k8, v8, additive), _attend(q, k8, v8, mask))


def test_packed_head_rows_do_not_depend_on_the_rows_beside_them():
    """The bf16 head on the CPU runs on a pre-blocked copy (packed_head) where its rows are those of one-row calls:
    here it is used, and a row's logits are the same alone, in a batch of rows, in a tree and at no rows at all.
    Other dtypes keep the plain matmul."""

    from offload_runtime.model.transformer import GlobalWeights, packed_head

    g = torch.Generator().manual_seed(21)
    for V, D in ((4096, 384), (1000, 64), (49152, 576)):
        head = (torch.randn(V, D, generator=g) * 0.02).to(torch.bfloat16)
        packed = packed_head(head)
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            assert packed is not None, (V, D)
        weights = GlobalWeights(head, head[0], head, packed)
        for shape in ((1, 1), (3, 1), (2, 17), (1, 0), (1, 64)):
            x = torch.randn(*shape, D, generator=g).to(torch.bfloat16)
            rows = x.reshape(-1, D)
            alone = [weights.logits(rows[i:i + 1]) for i in range(len(rows))]
            assert torch.equal(weights.logits(x).reshape(-1, V), torch.cat(alone) if alone else rows.new_empty(0, V))
    for dtype in (torch.float32, torch.float16, torch.float64):
        assert packed_head(torch.randn(64, 32).to(dtype)) is None
    # the copy counts where the model runs (the CPU's "device" memory), for the target and a draft of its own
    from offload_runtime.model.config import ModelArgs
    from offload_runtime.residency import fixed_device_bytes

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=1000, intermediate_size=128)
    kw = dict(draft_args=args, batch=1, max_seq_len=64, tree_size=4, max_chunk=64, slots=0)
    cpu = fixed_device_bytes(args, torch.bfloat16, on_cuda=False, **kw)
    assert cpu["head, pre-blocked copy"] == cpu["draft head, pre-blocked copy"] == 1000 * 64 * 2
    assert "draft head, pre-blocked copy" not in fixed_device_bytes(args, torch.bfloat16, on_cuda=False,
                                                                  draft_shares_globals=True, **kw)
    for dtype, on_cuda in ((torch.float32, False), (torch.bfloat16, True)):
        assert not any("pre-blocked" in k for k in fixed_device_bytes(args, dtype, on_cuda=on_cuda, **kw))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_rms_norm_and_rope_give_the_reference_formulas_bits(dtype):
    """The layer's rms_norm (torch's op) and RoPE (sign folded into sin, roll for rotate_half) against
    transformers' own formulas, written out: the same bits, for every dtype (float64 statistics in float32)."""
    from offload_runtime.model.config import ModelArgs
    from offload_runtime.model.transformer import apply_rope, rms_norm, rope_cos_sin, rope_inv_freq

    g = torch.Generator().manual_seed(13)
    for D, scale in ((64, 1e-3), (576, 1.0), (1000, 30.0)):
        x = (torch.randn(2, 5, D, generator=g) * scale).to(dtype)
        weight = torch.randn(D, generator=g).to(dtype)
        h = x.to(torch.float32)
        want = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        assert torch.equal(rms_norm(x, weight, 1e-5), want), D
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=16, intermediate_size=8)
    positions = torch.tensor([[0, 3, 17, 250]])
    cos, sin = rope_cos_sin(rope_inv_freq(args), positions, dtype)
    freqs = positions[..., None].float() * rope_inv_freq(args)
    emb = torch.cat((freqs, freqs), dim=-1)
    ref_cos, ref_sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
    assert torch.equal(cos, ref_cos)
    q = torch.randn(1, 4, 4, 16, generator=g).to(dtype)
    rotated = torch.cat((-q[..., 8:], q[..., :8]), dim=-1)  # transformers' rotate_half
    assert torch.equal(apply_rope(q, cos, sin), q * ref_cos + rotated * ref_sin)
