"""Several sequences share every weight sweep, and each gets exactly what it would get alone."""
import pytest

from offload_runtime import Engine

PROMPTS = [[5, 9, 14], list(range(3, 30)), [7], [40, 41, 42, 43, 44, 45, 46], [11, 3] * 6, [99, 98, 97, 96],
           list(range(60, 80)), [8, 8, 8, 8, 8]]
MAX_NEW = [20, 7, 33, 12, 25, 3, 16, 28]  # sequences finish at different steps; others join their rows


def run_batch(engine, greedy: bool):
    kw = dict(temperature=0) if greedy else dict(temperature=0.9, top_p=0.95)
    reqs = [engine.request(p, max_new_tokens=m, ignore_eos=True, seed=100 + i, **kw)
            for i, (p, m) in enumerate(zip(PROMPTS, MAX_NEW))]
    out = [None] * len(reqs)
    order = []
    for i, result in engine.run(reqs):
        out[i] = result.token_ids
        order.append(i)
    engine.test_steps = sum(r.stats.steps for r in reqs)
    return out, order


@pytest.fixture(scope="module")
def alone(tiny_pair):
    target, draft = tiny_pair
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float64", tree=[-1, 0, 0, 1, 1, 2, 3])
    return {greedy: run_batch(engine, greedy)[0] for greedy in (True, False)}


@pytest.mark.parametrize("offload", [False, True])
def test_greedy_batch_equals_each_prompt_alone(tiny_pair, alone, offload):
    target, draft = tiny_pair
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float64", tree=[-1, 0, 0, 1, 1, 2, 3],
                                    batch_size=4, offload=offload, resident_layers=1 if offload else None)
    got, order = run_batch(engine, greedy=True)
    assert got == alone[True]
    assert [len(t) for t in got] == MAX_NEW
    assert order != sorted(order)  # they really finished out of order, rows were reused
    if offload:
        # one sweep serves every live row: far fewer sweeps than the rows' steps added up
        assert len(engine.sweep_stats()) < engine.test_steps / 2


def test_sampled_batch_with_seeds_equals_each_prompt_alone(tiny_pair, alone):
    target, draft = tiny_pair
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float64", tree=[-1, 0, 0, 1, 1, 2, 3],
                                    batch_size=5)
    got, _ = run_batch(engine, greedy=False)
    assert got == alone[False]


def test_plain_decoding_batches_too(tiny_pair):
    target, _ = tiny_pair
    single = Engine.from_pretrained(target, draft=False, dtype="float64")
    batched = Engine.from_pretrained(target, draft=False, dtype="float64", batch_size=3)
    a = [r.token_ids for r in single.generate(PROMPTS[:5], max_new_tokens=10, temperature=0, ignore_eos=True)]
    b = [r.token_ids for r in batched.generate(PROMPTS[:5], max_new_tokens=10, temperature=0, ignore_eos=True)]
    assert a == b
