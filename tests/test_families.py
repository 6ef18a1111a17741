"""Model families: Qwen3 against transformers, sliding windows past the window, drafts whose embedding tables are
padded to another size, the vocabulary check, and the aliases with their drafts and sizes."""
import pytest
import torch

from helpers import make_checkpoint, make_tokenizer, make_truncated_draft, reference_model
from test_generate import hf_greedy
from test_model import _cuda_like_sdpa, ours, path_to, random_tree, ref_logits, rel_err, run
from offload_runtime import Engine
from offload_runtime.api import registry
from offload_runtime.api.loading import check_vocab_compatible
from offload_runtime.errors import ConfigError, UsageError
from offload_runtime.model.config import ModelArgs
from offload_runtime.model.kv_cache import KVCache
from offload_runtime.model.transformer import Transformer
from offload_runtime.model.tree import Tree

TREE = [-1, 0, 0, 1, 1, 2, 3, 6]  # depth 4, bushy at the top


def variant(model: Transformer, **changes) -> Transformer:
    """The same weights under other ModelArgs: the wrong variants a test must tell apart from the right one."""
    return Transformer(model.args.replace(**changes), model.globals, model.layers, model.device)


def prompt(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- Qwen3: per-head q/k norms, head_dim apart from the width


@pytest.fixture(scope="module")
def qwen3_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    target = make_checkpoint(root / "target", "qwen3-qk-norm", seed=21, num_hidden_layers=3)
    draft = make_truncated_draft(target, root / "draft", "qwen3-qk-norm", n_layers=1, noise=0.02, seed=6)
    return target, draft


def test_qwen3_config_and_logits_against_transformers(qwen3_pair):
    target, _ = qwen3_pair
    args = ModelArgs.from_file(target)
    assert args.model_type == "qwen3" and args.qk_norm and not args.qkv_bias
    assert args.head_dim == 24 != args.dim // args.n_heads
    assert args.layer_shapes()["self_attn.q_norm.weight"] == (24,)
    model, ref = ours(target, torch.float64), reference_model(target, torch.float64)
    ids = prompt(args.vocab_size, 30, seed=1)
    cache = KVCache(args, 1, 40, torch.float64, "cpu")
    want = ref_logits(ref, ids)
    assert rel_err(run(model, cache, 0, Tree.chain(30), ids), want) < 1e-10
    # Without the q/k norms the logits are far off: the norms are really applied, and the check can fail.
    wrong = run(variant(model, qk_norm=False), KVCache(args, 1, 40, torch.float64, "cpu"), 0, Tree.chain(30), ids)
    assert rel_err(wrong, want) > 1e-2
    # Qwen3Config's head_dim is 128 when config.json has none, whatever hidden_size / heads is.
    base = {"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
            "vocab_size": 32, "intermediate_size": 8}
    assert ModelArgs.from_hf_config(base).head_dim == 128
    assert ModelArgs.from_hf_config({**base, "attention_bias": True}).o_bias


@pytest.mark.parametrize("fold", [False, True], ids=["grouped", "folded"])
def test_qwen3_tree_forward_equals_transformers_on_each_path(qwen3_pair, fold, monkeypatch):
    target, _ = qwen3_pair
    model, ref = ours(target, torch.float64), reference_model(target, torch.float64)
    model.fold_groups = fold
    if fold:
        _cuda_like_sdpa(monkeypatch)
    gen = torch.Generator().manual_seed(4)
    prefix = prompt(model.args.vocab_size, 7, seed=2)
    tree = random_tree(12, gen)
    tokens = torch.randint(0, model.args.vocab_size, (len(tree),), generator=gen).tolist()
    cache = KVCache(model.args, 1, 40, torch.float64, "cpu")
    run(model, cache, 0, Tree.chain(len(prefix)), prefix)
    length = cache.keep(0, 0, range(len(prefix)))
    got = run(model, cache, length, tree, tokens)
    for node in range(len(tree)):
        seq = prefix + [tokens[u] for u in path_to(tree, node)]
        assert rel_err(got[node], ref_logits(ref, seq)[-1]) < 1e-10, node


@pytest.mark.parametrize("how", ["resident", "streamed-0", "streamed-1", "draft", "draft-streamed"])
def test_qwen3_greedy_equals_transformers_generate(qwen3_pair, how):
    target, draft = qwen3_pair
    ids = prompt(128, 9, seed=3)
    expected = hf_greedy(target, ids, 40)
    kwargs = dict(draft=False)
    if how.startswith("streamed"):
        kwargs.update(offload=True, resident_layers=int(how[-1]))
    if how.startswith("draft"):
        kwargs.update(draft=str(draft), tree=TREE)
    if how == "draft-streamed":
        kwargs.update(offload=True, resident_layers=1)
    engine = Engine.from_pretrained(target, dtype="float64", **kwargs)
    assert engine.offloaded == ("streamed" in how)
    result = engine.generate(ids, max_new_tokens=40, temperature=0, ignore_eos=True)[0]
    assert result.token_ids == expected
    if how.startswith("draft"):
        assert result.stats.tokens_per_step > 1.2  # the draft's guesses are accepted: trees are verified


# --- sliding windows, past the window

WINDOW = 8
SLIDING = {
    # every layer slides (Mistral v0.1)
    "mistral": ("mistral-gqa", dict(sliding_window=WINDOW, num_hidden_layers=2), ()),
    # layer 0 attends fully, layers 1-2 slide (Qwen's max_window_layers)
    "qwen2": ("qwen2-bias", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                 num_hidden_layers=3), (0,)),
    "qwen3": ("qwen3-qk-norm", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                    num_hidden_layers=3), (0,)),
}


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    root = tmp_path_factory.mktemp("windowed")
    return {name: make_checkpoint(root / name, config, seed=30 + i, **overrides)
            for i, (name, (config, overrides, _)) in enumerate(SLIDING.items())}


@pytest.mark.parametrize("fold", [False, True], ids=["grouped", "folded"])
@pytest.mark.parametrize("name", list(SLIDING))
def test_sliding_window_logits_match_transformers_past_the_window(windowed, name, fold, monkeypatch):
    """Prefill, then one token at a time to three windows' length, then a tree: float64 logits at every step
    against transformers' full forward. The wrong variants (no window, a window one longer, every layer
    windowed) are caught by the same comparison."""
    path = windowed[name]
    model, ref = ours(path, torch.float64), reference_model(path, torch.float64)
    assert model.args.sliding_window == WINDOW and model.args.full_attention_layers == SLIDING[name][2]
    model.fold_groups = fold
    if fold:
        _cuda_like_sdpa(monkeypatch)
    ids = prompt(model.args.vocab_size, 3 * WINDOW, seed=5)
    want = ref_logits(ref, ids)
    wrongs = {"no window": variant(model, sliding_window=None), "window + 1": variant(model, sliding_window=WINDOW + 1)}
    if model.args.full_attention_layers:
        wrongs["every layer windowed"] = variant(model, full_attention_layers=())
    for label, m in [("ours", model)] + list(wrongs.items()):
        m.fold_groups = fold
        cache = KVCache(m.args, 1, 64, torch.float64, "cpu")
        got = [run(m, cache, 0, Tree.chain(5), ids[:5])]
        length = cache.keep(0, 0, range(5))
        for t in range(5, len(ids)):
            got.append(run(m, cache, length, Tree([-1]), [ids[t]]))
            length = cache.keep(0, length, [0])
        err = rel_err(torch.cat(got), want)
        assert err < 1e-10 if label == "ours" else err > 1e-6, (label, err)
    # A tree deeper than the window, two branches interleaved in breadth-first order, so a node's slot and its
    # position differ: each node sees the window of its own path's positions (windows taken over slots fail).
    tree = Tree([-1, 0, 0] + [i - 2 for i in range(3, 25)])
    assert tree.max_depth == 12 > WINDOW
    tokens = torch.randint(0, model.args.vocab_size, (len(tree),), generator=torch.Generator().manual_seed(8)).tolist()
    prefix = ids[: 2 * WINDOW - 2]
    cache = KVCache(model.args, 1, 64, torch.float64, "cpu")
    run(model, cache, 0, Tree.chain(len(prefix)), prefix)
    got = run(model, cache, cache.keep(0, 0, range(len(prefix))), tree, tokens)
    for node in range(len(tree)):
        seq = prefix + [tokens[u] for u in path_to(tree, node)]
        assert rel_err(got[node], ref_logits(ref, seq)[-1]) < 1e-10, node


@pytest.mark.parametrize("how", ["plain", "draft", "draft-streamed"])
@pytest.mark.parametrize("name", list(SLIDING))
def test_sliding_window_greedy_equals_transformers_generate(windowed, name, how):
    """40 tokens from a 5-token prompt: five windows' worth, with trees grafted across the window's edge."""
    path = windowed[name]
    ids = prompt(128, 5, seed=6)
    expected = hf_greedy(path, ids, 40)
    kwargs = {"plain": dict(draft=False), "draft": dict(draft=str(path), tree=TREE),
              "draft-streamed": dict(draft=str(path), tree=TREE, offload=True, resident_layers=1)}[how]
    engine = Engine.from_pretrained(path, dtype="float64", **kwargs)
    result = engine.generate(ids, max_new_tokens=40, temperature=0, ignore_eos=True)[0]
    assert result.token_ids == expected


def test_sliding_window_config_follows_transformers():
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 4, "vocab_size": 32,
            "intermediate_size": 8, "sliding_window": 16}
    mistral = ModelArgs.from_hf_config({**base, "model_type": "mistral"})
    assert mistral.sliding_window == 16 and all(mistral.slides(i) for i in range(4))
    # Llama has no sliding window: transformers ignores the key, so do we
    assert ModelArgs.from_hf_config({**base, "model_type": "llama"}).sliding_window is None
    for qwen in ("qwen2", "qwen3"):
        off = ModelArgs.from_hf_config({**base, "model_type": qwen, "max_window_layers": 1})
        assert off.sliding_window is None  # use_sliding_window is off by default
        on = {**base, "model_type": qwen, "use_sliding_window": True}
        a = ModelArgs.from_hf_config({**on, "max_window_layers": 3})
        assert a.full_attention_layers == (0, 1, 2) and [a.slides(i) for i in range(4)] == [False] * 3 + [True]
        # max_window_layers past the depth (Qwen2.5 ships 70 with 48 layers): nothing slides
        assert ModelArgs.from_hf_config({**on, "max_window_layers": 70}).sliding_window is None
        # transformers 5 writes layer_types, which win over max_window_layers
        types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
        b = ModelArgs.from_hf_config({**on, "max_window_layers": 3, "layer_types": types})
        assert b.full_attention_layers == (1, 3)
        assert ModelArgs.from_hf_config(b.to_hf_config()) == b
        with pytest.raises(ConfigError, match="layer_types"):
            ModelArgs.from_hf_config({**on, "layer_types": ["sliding_attention"]})
        with pytest.raises(ConfigError, match="layer_types"):
            ModelArgs.from_hf_config({**on, "layer_types": ["chunked_attention"] * 4})
    with pytest.raises(ConfigError, match="sliding_window"):
        ModelArgs.from_hf_config({**base, "model_type": "mistral", "sliding_window": -4})


# --- drafts whose embedding tables are padded to another size, and the vocabulary check


def test_draft_with_a_smaller_padded_embedding_and_the_same_tokenizer(tmp_path):
    """Like Qwen2.5-0.5B (151936 rows) drafting for 72B (152064): one 128-token tokenizer, tables of 136 and
    160 rows. The random target emits ids past the draft's table, which the draft must take without failing;
    greedy output stays the target's own."""
    target = make_checkpoint(tmp_path / "target", "qwen2-bias", seed=41, vocab_size=160, num_hidden_layers=3)
    draft = make_truncated_draft(target, tmp_path / "draft", "qwen2-bias", n_layers=2, noise=0.02, seed=7,
                                 vocab_size=136)
    for path in (target, draft):
        make_tokenizer(path, 128)
    ids = prompt(128, 6, seed=7)
    expected = hf_greedy(target, ids, 48)
    assert any(t >= 136 for t in expected)  # the case that needs care does happen
    engine = Engine.from_pretrained(target, dtype="float64", draft=str(draft), tree=TREE)
    assert engine.draft.args.vocab_size == 136 and engine.target.args.vocab_size == 160
    result = engine.generate(ids, max_new_tokens=48, temperature=0, ignore_eos=True)[0]
    assert result.token_ids == expected and result.stats.tokens_per_step > 1.2
    sampled = engine.generate(ids, max_new_tokens=48, temperature=1.0, seed=3, ignore_eos=True)[0]
    assert len(sampled.token_ids) == 48


def test_vocabulary_check_names_the_tokens_that_differ(tmp_path, capsys):
    from transformers import AutoTokenizer

    def tokenizer(name, renamed=None):
        make_tokenizer(tmp_path / name, 128, renamed)
        return AutoTokenizer.from_pretrained(str(tmp_path / name))

    same, padded = tokenizer("a"), ModelArgs(vocab_size=160, n_heads=4, n_kv_heads=4)
    assert check_vocab_compatible(padded, ModelArgs(vocab_size=136), same, tokenizer("b"), "t", "d") is None
    # A draft whose table is short of its own tokenizer's ids: weights and tokenizer of different models.
    with pytest.raises(UsageError, match=r"draft d's embedding has 100 rows but the tokenizer has ids up to 127: the "
                                         r"checkpoint's weights and its tokenizer do not belong together"):
        check_vocab_compatible(padded, ModelArgs(vocab_size=100), same, tokenizer("b"), "t", "d")
    # A few renamed special tokens (the R1 distills' case): allowed, and the notice says which ids.
    notice = check_vocab_compatible(padded, padded, same, tokenizer("c", {"<|user|>": "<｜User｜>"}), "t", "d")
    assert "differ in 1 token id (" in notice and "id 4 is '<|user|>' in the target but '<｜User｜>' in the draft" in notice
    # A side without a tokenizer cannot be compared: said, not refused (nor passed in silence).
    assert "draft d has no tokenizer, so the pair's vocabularies cannot be compared" in \
        check_vocab_compatible(padded, padded, same, None, "t", "d")
    assert check_vocab_compatible(padded, padded, None, None, "t", "d") is None  # token ids only, on both sides
    # Another vocabulary: refused, naming the first ids that differ.
    other = tokenizer("e", {f"w{i}": f"v{i}" for i in range(60)})
    with pytest.raises(UsageError, match=r"another vocabulary .*: id \d+ is 'w\d+' in the target but 'v\d+' in the "
                                         r"draft.*\(and \d+ more ids\)"):
        check_vocab_compatible(padded, padded, same, other, "t", "d")
    # End to end: the engine refuses such a pair before loading weights, and prints the notice for a near one.
    target = make_checkpoint(tmp_path / "target", "llama-mha", seed=1)
    far, near = make_checkpoint(tmp_path / "far", "llama-mha", seed=2), make_checkpoint(tmp_path / "near", "llama-mha")
    make_tokenizer(target, 128)
    make_tokenizer(far, 128, {f"w{i}": f"v{i}" for i in range(60)})
    make_tokenizer(near, 128, {"<|end|>": "<｜end▁of▁sentence｜>"})
    with pytest.raises(UsageError, match="id 61 is 'w0' in the target but 'v0' in the draft"):
        Engine.from_pretrained(target, draft=str(far), dtype="float32")
    capsys.readouterr()
    Engine.from_pretrained(target, draft=str(near), dtype="float32")
    assert "id 6 is '<|end|>' in the target" in capsys.readouterr().err


# --- aliases, default drafts, sizes

ISSUE_ALIASES = (
    ["llama-3.2-1b", "llama-3.2-3b", "llama-3.2-1b-instruct", "llama-3.2-3b-instruct", "llama-3.3-70b-instruct"]
    + [f"qwen2.5-{s}{i}" for s in ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b") for i in ("", "-instruct")]
    + [f"qwen3-{s}" for s in ("0.6b", "1.7b", "4b", "8b", "14b", "32b")]
    + ["deepseek-r1-distill-llama-8b", "deepseek-r1-distill-llama-70b"]
    + [f"deepseek-r1-distill-qwen-{s}" for s in ("1.5b", "7b", "14b", "32b")]
    + ["llama-3.1-70b-instruct-awq", "llama-3.3-70b-instruct-awq", "qwen2.5-32b-instruct-awq",
       "qwen2.5-72b-instruct-awq", "qwen3-32b-awq", "deepseek-r1-distill-llama-70b-awq"]
)


def test_aliases_and_default_drafts():
    drafts = {
        "llama-3.3-70b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
        "qwen2.5-72b-instruct": "Qwen/Qwen2.5-0.5B-Instruct",
        "qwen2.5-32b": "Qwen/Qwen2.5-0.5B",
        "qwen3-32b": "Qwen/Qwen3-0.6B",
        "deepseek-r1-distill-llama-70b": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
        "deepseek-r1-distill-qwen-32b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        # the smallest of each tokenizer has no smaller sibling to draft for it
        "llama-3.2-1b-instruct": None, "qwen2.5-0.5b": None, "qwen3-0.6b": None,
        "deepseek-r1-distill-llama-8b": None, "deepseek-r1-distill-qwen-1.5b": None,
        # AWQ checkpoints draft with their fp16 siblings' drafts
        "qwen2.5-72b-instruct-awq": "Qwen/Qwen2.5-0.5B-Instruct", "qwen3-32b-awq": "Qwen/Qwen3-0.6B",
        "llama-3.1-70b-instruct-awq": "meta-llama/Llama-3.2-1B-Instruct",
    }
    for alias, draft in drafts.items():
        assert registry.default_draft(alias) == draft, alias
    assert registry.resolve_name("qwen2.5-72b-instruct") == "Qwen/Qwen2.5-72B-Instruct"
    assert registry.resolve_name("deepseek-r1-distill-qwen-7b") == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert registry.default_draft("Qwen/Qwen3-14B") == "Qwen/Qwen3-0.6B"  # by repo id too
    assert registry.preset_for("Qwen/Qwen3-14B") == "qwen3-14b" and registry.preset_for("qwen3-14b") == "qwen3-14b"
    listed = {row.alias: row for row in registry.list_models()}
    assert set(ISSUE_ALIASES) <= set(listed)
    for row in (listed[a] for a in ISSUE_ALIASES):
        if row.draft is None:
            continue
        # each draft is itself a listed model, of the same architecture, a fraction of the target's size
        draft = next(r for r in listed.values() if r.repo == row.draft)
        t_args, d_args = (ModelArgs.from_name(registry.preset_for(r.alias)) for r in (row, draft))
        assert d_args.model_type == t_args.model_type, row.alias
        assert d_args.vocab_size in (t_args.vocab_size, 151936, 152064) or t_args.model_type == "llama", row.alias
        assert 2.5 * draft.params <= row.params, row.alias


def test_listing_sizes_match_published_figures():
    """Parameter counts as the repos publish them (model cards / the hub's safetensors count) and the AWQ
    estimate against a published AWQ checkpoint: Qwen/Qwen2.5-32B-Instruct-AWQ's five shards total 19.33 GB."""
    rows = {r.alias: r for r in registry.list_models()}
    published_params = {"llama-3.1-8b": 8.03e9, "llama-3.3-70b-instruct": 70.55e9, "llama-3.2-1b": 1.24e9,
                        "qwen2.5-72b-instruct": 72.7e9, "qwen2.5-0.5b": 0.494e9, "qwen3-32b": 32.8e9,
                        "qwen3-14b": 14.8e9, "deepseek-r1-distill-qwen-1.5b": 1.78e9}
    for alias, params in published_params.items():
        assert rows[alias].params == pytest.approx(params, rel=0.005), alias
        assert rows[alias].fp16_bytes == 2 * rows[alias].params
    assert rows["qwen2.5-32b-instruct"].int4_bytes == pytest.approx(19.33e9, rel=0.002)
    assert rows["qwen2.5-32b-instruct-awq"].int4_bytes == rows["qwen2.5-32b-instruct"].int4_bytes
    # tied embeddings are counted once: Qwen2.5-0.5B ties, -7B does not
    assert ModelArgs.from_name("qwen2.5-0.5b").tie_word_embeddings and not ModelArgs.from_name("qwen2.5-7b").tie_word_embeddings


def test_list_models_flag_prints_the_listing_without_loading(monkeypatch, capsys):
    from offload_runtime import chat, cli

    def no_load(*a, **k):
        raise AssertionError("--list-models loaded a model")

    monkeypatch.setattr(chat, "load_engine", no_load)
    assert chat.main(["--list-models"]) == 0
    rows = registry.list_models()
    table = cli.format_model_list(rows).splitlines()
    assert capsys.readouterr().out.splitlines() == table
    assert len(table) == len(rows) + 3 and all(line.startswith(r.alias + " ") for line, r in zip(table[1:], rows))
