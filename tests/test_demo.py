"""The bundled demo pair loads through the normal checkpoint path and decodes losslessly."""
import pytest
import torch

from offload_runtime.api import registry
from offload_runtime.weights.checkpoint import Checkpoint
from offload_runtime.api.text import load_tokenizer
from offload_runtime import Engine


@pytest.fixture(scope="module")
def demo():
    return registry.demo_paths()


def test_demo_checkpoints_load_and_match_their_configs(demo):
    target, draft = (Checkpoint(p) for p in demo)
    for ck in (target, draft):
        ck.validate()
        assert ck.args.model_type == "llama" and ck.args.torch_dtype in ("float16", "bfloat16")
        assert all(t.dtype in (torch.float16, torch.bfloat16) for t in ck.tensors.values())
    assert target.args.vocab_size == draft.args.vocab_size == 4096
    assert 10e6 <= target.args.n_params() <= 30e6
    assert draft.args.n_params() <= target.args.n_params() / 10
    assert sum(f.stat().st_size for d in demo for f in d.iterdir()) <= 40e6


def test_demo_tokenizer_round_trips_and_is_shared(demo):
    tok, dtok = (load_tokenizer(p) for p in demo)
    assert tok.get_vocab() == dtok.get_vocab()
    text = "And God said, Let there be light: and there was light."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hello."}], tokenize=False, add_generation_prompt=True)
    assert "Hello." in chat and chat.rstrip().endswith("<|assistant|>")


def test_demo_greedy_speculative_equals_plain(demo):
    plain = Engine.from_pretrained("demo", draft=False, dtype="float32", quiet=True)
    spec = Engine.from_pretrained("demo", dtype="float32", quiet=True, tree=[-1, 0, 0, 1, 1, 2, 3, 4, 5, 7])
    assert spec.draft is not None  # the demo's default draft
    prompts = ["And the LORD spake unto Moses, saying,", "In the beginning"]
    a = plain.generate(prompts, max_new_tokens=48, temperature=0, ignore_eos=True)
    b = spec.generate(prompts, max_new_tokens=48, temperature=0, ignore_eos=True)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert all(r.stats.tokens_per_step > 2.0 for r in b)  # the draft really predicts the target
    assert "LORD" in a[0].text or "God" in a[0].text  # it has learnt its corpus
