"""Engine.generate against transformers' generate, plain and speculative."""
import pytest
import torch

from helpers import reference_model
from offload_runtime import Engine
from offload_runtime.errors import ContextLengthError, UsageError

ARCH_CONFIGS = ["llama-gqa-llama3", "mistral-gqa", "qwen2-bias", "llama-tied-bias-linear"]


def hf_greedy(path, ids, n):
    ref = reference_model(path, torch.float64)
    ref.generation_config.eos_token_id = None  # run the full n tokens, like ignore_eos (min_new_tokens would ban EOS)
    out = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape[1] == len(ids) + n
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def hf_streams(checkpoints):
    prompts = {}
    for name in ARCH_CONFIGS:
        vocab = 96 if "tied" in name else 128
        ids = torch.randint(3, vocab, (11,), generator=torch.Generator().manual_seed(4)).tolist()
        prompts[name] = (ids, hf_greedy(checkpoints[name], ids, 64))
    return prompts


@pytest.mark.parametrize("name", ARCH_CONFIGS)
def test_greedy_plain_equals_transformers(checkpoints, hf_streams, name):
    ids, expected = hf_streams[name]
    engine = Engine.from_pretrained(checkpoints[name], dtype="float64", draft=False)
    result = engine.generate(ids, max_new_tokens=64, temperature=0, ignore_eos=True)[0]
    assert result.token_ids == expected
    assert result.finish_reason == "length" and result.stats.steps == 64


@pytest.mark.parametrize("tree", [
    [-1, 0, 1, 2, 3, 4],  # a chain
    [-1, 0, 0, 0, 1, 1, 2, 4, 4, 7],  # a bushy tree
])
@pytest.mark.parametrize("name", ["llama-gqa-llama3", "qwen2-bias"])
def test_greedy_speculative_equals_transformers(checkpoints, hf_streams, tiny_pair, name, tree):
    """A draft that disagrees often (another random model) still leaves the output unchanged."""
    ids, expected = hf_streams[name]
    other = "mistral-gqa"  # same vocabulary size, unrelated weights
    engine = Engine.from_pretrained(checkpoints[name], dtype="float64", draft=str(checkpoints[other]), tree=tree)
    result = engine.generate(ids, max_new_tokens=64, temperature=0, ignore_eos=True)[0]
    assert result.token_ids == expected


def test_greedy_speculative_with_cuda_attention_layout_equals_transformers(checkpoints, hf_streams, monkeypatch):
    """The engine with grouped-query attention as CUDA runs it (folded masks; SDPA's output strided as the
    memory-efficient kernel returns it), on the CPU: the output is still transformers' own."""
    from test_model import _cuda_like_sdpa

    name = "llama-gqa-llama3"
    ids, expected = hf_streams[name]
    # the target as its own draft: GQA on both sides, and whole paths accepted through the folded verifier
    engine = Engine.from_pretrained(checkpoints[name], dtype="float64", draft=str(checkpoints[name]),
                                    tree=[-1, 0, 0, 0, 1, 1, 2, 4, 4, 7])
    assert engine.target.fold_groups and engine.draft.fold_groups  # grouped-query models fold on every device
    _cuda_like_sdpa(monkeypatch)
    result = engine.generate(ids, max_new_tokens=64, temperature=0, ignore_eos=True)[0]
    assert result.token_ids == expected and result.stats.tokens_per_step > 1


def test_draft_equal_to_target_accepts_whole_deepest_path(checkpoints):
    path = checkpoints["llama-mha"]
    tree = [-1, 0, 0, 1, 1, 2, 3, 3, 6]  # depth 4
    engine = Engine.from_pretrained(path, dtype="float64", draft=str(path), tree=tree)
    result = engine.generate([5, 6, 7], max_new_tokens=40, temperature=0, ignore_eos=True)[0]
    assert result.stats.accepted_per_step == [4] * 8
    assert result.stats.tokens_per_step == 5.0


def test_eos_and_max_new_tokens_cut_the_accepted_path(checkpoints):
    path = checkpoints["llama-mha"]
    plain = Engine.from_pretrained(path, dtype="float64", draft=False)
    stream = plain.generate([5, 6, 7], max_new_tokens=30, temperature=0, ignore_eos=True)[0].token_ids
    eos = stream[9]
    first = stream.index(eos)
    spec = Engine.from_pretrained(path, dtype="float64", draft=str(path), tree=[-1, 0, 1, 2, 3, 4, 5])
    spec.eos_ids = frozenset([eos])
    got = spec.generate([5, 6, 7], max_new_tokens=30, temperature=0)[0]
    assert got.token_ids == stream[: first + 1] and got.finish_reason == "eos"
    got = spec.generate([5, 6, 7], max_new_tokens=8, temperature=0, ignore_eos=True)[0]
    assert got.token_ids == stream[:8] and got.finish_reason == "length"


def test_seeded_sampling_is_reproducible(checkpoints):
    path = checkpoints["llama-mha"]
    engine = Engine.from_pretrained(path, dtype="float32", draft=str(path), tree=[-1, 0, 0, 1, 2])
    a = engine.generate([5, 6, 7], max_new_tokens=20, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)[0]
    b = engine.generate([5, 6, 7], max_new_tokens=20, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)[0]
    c = engine.generate([5, 6, 7], max_new_tokens=20, temperature=0.8, top_p=0.9, seed=4, ignore_eos=True)[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_text_prompts_and_chat(tiny_pair):
    target, draft = tiny_pair
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float32")
    result = engine.generate("the cat sat on the mat", max_new_tokens=5, temperature=0, ignore_eos=True)[0]
    assert isinstance(result.text, str) and len(result.token_ids) == 5
    assert result.prompt_token_ids[: 1] == [engine.tokenizer.bos_token_id] or result.prompt_token_ids
    reply = engine.chat([{"role": "user", "content": "hello world"}], max_new_tokens=4, temperature=0,
                        ignore_eos=True)
    assert len(reply.token_ids) == 4


def test_bad_inputs_raise_clear_errors(checkpoints):
    engine = Engine.from_pretrained(checkpoints["llama-mha"], dtype="float32", draft=False, max_seq_len=32)
    with pytest.raises(ContextLengthError, match="context window"):
        engine.generate(list(range(40)), max_new_tokens=4)
    with pytest.raises(UsageError, match="temperature"):
        engine.generate([1, 2], temperature=-1)
    with pytest.raises(UsageError, match="top_p"):
        engine.generate([1, 2], top_p=0)
    with pytest.raises(UsageError, match="outside the vocabulary"):
        engine.generate([1, 999])
    with pytest.raises(UsageError, match="no tokenizer"):
        engine.generate("hello")
    with pytest.raises(UsageError, match="dtype"):
        Engine.from_pretrained(checkpoints["llama-mha"], dtype="int8")
    with pytest.raises(UsageError, match="device"):
        Engine.from_pretrained(checkpoints["llama-mha"], device="tpu")


def test_stream_pieces_join_to_the_generated_text(tiny_pair):
    target, draft = tiny_pair
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float32")
    pieces = list(engine.stream("the cat sat", max_new_tokens=12, temperature=0, ignore_eos=True))
    whole = engine.generate("the cat sat", max_new_tokens=12, temperature=0, ignore_eos=True)[0]
    assert len(pieces) > 1 and "".join(pieces) == whole.text
    stats = whole.stats
    assert stats.time_s >= stats.draft_s + stats.sweep_s > 0 and stats.host_s >= 0
    assert sum(stats.histogram().values()) == stats.steps


def test_stop_strings_cut_text_and_generation(tiny_pair):
    target, _ = tiny_pair
    engine = Engine.from_pretrained(target, draft=False, dtype="float32")
    full = engine.generate("the cat sat", max_new_tokens=12, temperature=0, ignore_eos=True)[0].text
    words = full.split()
    stop = words[3]
    cut = engine.generate("the cat sat", max_new_tokens=12, temperature=0, ignore_eos=True, stop=[stop])[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.startswith(cut.text)
    assert len(cut.token_ids) < 12


def test_generation_config_supplies_sampling_defaults(tiny_pair, tmp_path):
    import shutil

    from helpers import write_generation_config

    target, _ = tiny_pair
    path = shutil.copytree(target, tmp_path / "t")
    write_generation_config(path, do_sample=True, temperature=0.7, top_p=0.85, eos_token_id=2)
    engine = Engine.from_pretrained(path, draft=False, dtype="float32")
    params = engine.sampling_params(None, None, None, False, 1)
    assert (params.temperature, params.top_p) == (0.7, 0.85)
    write_generation_config(path, do_sample=False)
    engine = Engine.from_pretrained(path, draft=False, dtype="float32")
    assert engine.sampling_params(None, None, None, False, 1).temperature == 0.0
