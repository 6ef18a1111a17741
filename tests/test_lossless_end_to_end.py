"""End to end: speculative sampling emits the target's own distribution, token after token.

A target and a draft with a 12-token vocabulary make the exact law of the 2nd and 3rd generated tokens
computable by enumeration (12^2 continuations). Thousands of seeded generations through the engine (drafting,
tree attention, batching, verification, KV compaction) must fit it; the same test with SpecInfer's
verification of without-replacement children must fail, which shows the sample is large enough to notice.
"""
import pytest
import torch

from helpers import ALPHA, chi_square_pvalue, make_checkpoint, reference_model
from offload_runtime import Engine
from offload_runtime.spec import sampling
from offload_runtime.spec.methods import Method, draw_without_replacement
from offload_runtime.spec.verify import verify_specinfer

VOCAB = 12
PROMPT = [3, 7, 1, 9]
TREE = [-1, 0, 0, 0, 1, 1, 2, 4, 5]  # three children at the root, depth 3
N = 3000
SETTINGS = dict(temperature=1.0, top_p=0.9)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("lossless")
    # A spread-out target (a peaked one tests little) and a more peaked, different draft: then drawing
    # children without replacement differs much from drawing with replacement, so the wrong rule shows.
    target = make_checkpoint(root / "t", "llama-mha", seed=21, vocab_size=VOCAB, initializer_range=0.08)
    draft = make_checkpoint(root / "d", "llama-mha", seed=22, vocab_size=VOCAB, num_hidden_layers=1,
                            initializer_range=0.3)
    return target, draft


def exact_laws(target_path):
    """Laws of the 2nd and 3rd generated tokens under the target's own (warped) sampling."""
    ref = reference_model(target_path, torch.float64)
    warp = lambda logits: sampling.warp_probs(logits, **SETTINGS)  # noqa: E731
    with torch.no_grad():
        p1 = warp(ref(torch.tensor([PROMPT])).logits[0, -1])  # [V]
        first = torch.tensor([PROMPT + [a] for a in range(VOCAB)])
        p2 = warp(ref(first).logits[:, -1])  # [V(t1), V(t2)]
        second = torch.tensor([PROMPT + [a, b] for a in range(VOCAB) for b in range(VOCAB)])
        p3 = warp(ref(second).logits[:, -1]).view(VOCAB, VOCAB, VOCAB)  # [t1, t2, t3]
    joint12 = p1[:, None] * p2
    return joint12.sum(0), (joint12[:, :, None] * p3).sum((0, 1))


def sample_tokens(engine, n):
    results = engine.generate([PROMPT] * n, max_new_tokens=3, ignore_eos=True, seed=list(range(n)), **SETTINGS)
    toks = torch.tensor([r.token_ids for r in results])
    assert toks.shape == (n, 3)
    return toks


def test_speculative_sampling_has_the_targets_distribution(pair):
    target, draft = pair
    law2, law3 = exact_laws(target)
    assert law2.max() < 0.5 and (law2 > 0.01).sum() >= 6  # a spread-out law: the test has teeth
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float64", tree=TREE, batch_size=64)
    toks = sample_tokens(engine, N)
    assert sum(engine.last_stats[i].tokens_per_step for i in range(N)) / N > 1.2  # trees were really accepted
    p2 = chi_square_pvalue(torch.bincount(toks[:, 1], minlength=VOCAB), law2)
    p3 = chi_square_pvalue(torch.bincount(toks[:, 2], minlength=VOCAB), law3)
    assert p2 > ALPHA and p3 > ALPHA, (p2, p3)

    # A mismatched pair: children drawn without replacement, verified by SpecInfer's rule (made for children
    # drawn with replacement). Built as a method like any other; it must fail the same test.
    mismatched = Method("mismatched", draw_children=draw_without_replacement, verifier=verify_specinfer)
    wrong = Engine.from_pretrained(target, draft=str(draft), dtype="float64", tree=TREE, batch_size=64,
                                   method=mismatched)
    toks = sample_tokens(wrong, N)
    p2 = chi_square_pvalue(torch.bincount(toks[:, 1], minlength=VOCAB), law2)
    p3 = chi_square_pvalue(torch.bincount(toks[:, 2], minlength=VOCAB), law3)
    assert min(p2, p3) < ALPHA, (p2, p3)
