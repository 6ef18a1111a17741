"""Self-drafts (draft="self-int4" / "self-int8" / "self"): the target's own checkpoint quantized on load drafts
for it. Greedy output equals plain decoding on the four architectures, sampled output has the target's exact
distribution (the end-to-end test of tests/test_lossless_end_to_end.py), the embedding and head are the target's
own tensors, and every bad combination is one line."""
from __future__ import annotations

import pytest
import torch

from helpers import ALPHA, chi_square_pvalue, one_line_error, run_cli
from offload_runtime import Engine
from offload_runtime.errors import ResourceError, UsageError
from offload_runtime.model.batch import RowChunk, build_forward
from offload_runtime.model.config import ModelArgs
from offload_runtime.model.quantization import QuantSpec
from offload_runtime.model.kv_cache import KVCache
from offload_runtime.model.tree import Tree
from offload_runtime.residency import fixed_device_bytes
from test_lossless_end_to_end import TREE, VOCAB, exact_laws, pair, sample_tokens  # noqa: F401 (fixture)

IDS = [3, 17, 44, 9]
SPEC_TREE = [-1, 0, 0, 1, 1, 2, 3, 4]  # depth 3: at most 4 tokens per step


def greedy(engine, n: int = 30):
    return engine.generate(IDS, max_new_tokens=n, temperature=0, ignore_eos=True)[0]


def logits(model, ids):
    cache = KVCache(model.args, 1, 64, model.dtype, "cpu")
    batch = build_forward([RowChunk(0, Tree.chain(len(ids)), ids, range(len(ids)), range(len(ids)))],
                          cache.scratch_slot, None, "cpu")
    return model.forward(batch, cache)[0]


@pytest.mark.parametrize("arch, draft", [("llama-mha", "self-int4"), ("mistral-gqa", "self-int4"),
                                         ("qwen2-bias", "self-int4"), ("qwen3-qk-norm", "self-int4"),
                                         ("llama-gqa-llama3", "self-int8")])
def test_greedy_with_a_self_draft_equals_plain_decoding(checkpoints, arch, draft):
    path = checkpoints[arch]
    plain = Engine.from_pretrained(path, dtype="float64", draft=False)
    spec = Engine.from_pretrained(path, dtype="float64", draft=draft, group_size=32, tree=SPEC_TREE, plan=None)
    got = greedy(spec)
    assert got.token_ids == greedy(plain).token_ids
    assert got.stats.steps <= 12  # the low-bit copy agrees: about 3 of 4 tree levels accepted per step
    # The draft is really the quantized copy (not the target itself), and shares the target's globals.
    assert not torch.equal(logits(spec.draft, IDS), logits(plain.target, IDS))
    assert spec.draft.globals is spec.target.globals


def test_a_quantized_target_drafts_with_a_lower_bit_copy_or_its_own_weights(checkpoints):
    path = checkpoints["llama-mha"]
    plain8 = Engine.from_pretrained(path, dtype="float64", draft=False, quantize="int8", group_size=32)
    lower = Engine.from_pretrained(path, dtype="float64", draft="self-int4", quantize="int8", group_size=32,
                                   tree=SPEC_TREE, plan=None)
    assert greedy(lower).token_ids == greedy(plain8).token_ids
    # "self": the very weights that stream, resident: a chain of 3 is accepted whole at every step.
    same = Engine.from_pretrained(path, dtype="float64", draft="self", quantize="int8", group_size=32,
                                  tree=[-1, 0, 1, 2], plan=None)
    got = greedy(same, 32)
    assert got.token_ids == greedy(plain8, 32).token_ids
    assert got.stats.steps == 8
    assert torch.equal(logits(same.draft, IDS), logits(same.target, IDS))
    # The int4 copy of an int8 target is not the same weights.
    assert not torch.equal(logits(lower.draft, IDS), logits(lower.target, IDS))


N = 2000


def test_engine_with_a_self_draft_has_the_targets_distribution(pair):  # noqa: F811
    target, _ = pair
    law2, law3 = exact_laws(target)
    engine = Engine.from_pretrained(target, draft="self-int4", group_size=-1, dtype="float64", tree=TREE,
                                    batch_size=64)
    toks = sample_tokens(engine, N)
    assert sum(engine.last_stats[i].tokens_per_step for i in range(N)) / N > 2  # deep acceptances: a strong draft
    p2 = chi_square_pvalue(torch.bincount(toks[:, 1], minlength=VOCAB), law2)
    p3 = chi_square_pvalue(torch.bincount(toks[:, 2], minlength=VOCAB), law3)
    assert p2 > ALPHA and p3 > ALPHA, (p2, p3)
    # The draft's own law is detectably another one at this sample size: a runtime that let draft tokens through
    # unverified would fail the test above.
    alone = Engine.from_pretrained(target, draft=False, quantize="int4", group_size=-1, dtype="float64",
                                   batch_size=64)
    toks = sample_tokens(alone, N)
    p2 = chi_square_pvalue(torch.bincount(toks[:, 1], minlength=VOCAB), law2)
    p3 = chi_square_pvalue(torch.bincount(toks[:, 2], minlength=VOCAB), law3)
    assert min(p2, p3) < ALPHA, (p2, p3)


# --- bad combinations: one line each, before any weight is read


@pytest.mark.parametrize("options, message", [
    (dict(draft="self-int4", draft_quantize="int4"), "already says how the draft is quantized"),
    (dict(draft="self"), "add --quantize int4|int8, or use --draft self-int4"),
    (dict(draft="self-int8", quantize="int4", group_size=32), "more bits than the target itself (int4-g32)"),
    (dict(draft="self-int4", group_size=128), "group_size"),
])
def test_bad_self_draft_options_are_one_line(checkpoints, options, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        Engine.from_pretrained(checkpoints["llama-mha"], dtype="float32", **options)


@pytest.mark.parametrize("draft, advice", [("self-int8", "use --draft self-int4 (fewer bits), an external draft"),
                                           ("self-int4", "use an external draft (--draft NAME) or no draft")])
def test_a_self_draft_that_does_not_fit_the_device_budget_says_what_to_do(checkpoints, draft, advice):
    path = checkpoints["llama-mha"]
    options = dict(dtype="float32", draft=draft, group_size=32, tree=[-1, 0], max_seq_len=64, offload=True,
                   plan=None)
    args = ModelArgs.from_file(path)
    fixed = fixed_device_bytes(args, torch.float32, draft_args=args, batch=1, max_seq_len=64, tree_size=2,
                               max_chunk=2048, slots=2, on_cuda=False, draft_quant=QuantSpec(int(draft[-1]), 32),
                               draft_shares_globals=True)
    rest = sum(fixed.values()) - fixed["draft"]
    Engine.from_pretrained(path, gpu_memory=rest + fixed["draft"], **options)  # exactly enough: it loads
    with pytest.raises(ResourceError, match=advice.replace("(", r"\(").replace(")", r"\)")):
        Engine.from_pretrained(path, gpu_memory=rest + fixed["draft"] - 1, **options)


def test_chat_refuses_a_self_draft_with_draft_quantize_in_one_line(checkpoints):
    proc = run_cli("offload_runtime.chat", "--model", checkpoints["llama-mha"], "--draft", "self-int4",
                   "--draft-quantize", "int4", stdin="hi\n")
    one_line_error(proc, 2, "already says how the draft is quantized")


def test_planner_compares_an_external_draft_self_drafts_and_no_draft(tiny_pair, tmp_path, monkeypatch):
    from planner.pipeline import PlanRequest, compare_drafts

    monkeypatch.setenv("OFFLOAD_RUNTIME_HOME", str(tmp_path))
    target, draft = tiny_pair
    req = PlanRequest(model=str(target), device="cpu", dtype="float32", temperature=0.0, quick=True, grid="1,2,4,8",
                      prefix=8, max_tree=8, max_depth=3, no_calibrate=True, group_size=32, max_new_tokens=8, limit=2,
                      policy="static")
    found = compare_drafts(req, [str(draft), "self-int4", "self"])
    by = {o.draft: o for o in found.options}
    assert list(by) == [str(draft), "self-int4", "self", "none"]
    assert by["self"].plan is None and "add --quantize" in by["self"].refused  # listed with its reason
    assert by["none"].tokens_per_step == 1.0 and by["none"].tokens_per_s > 0
    # Each planned draft has its own measured plan, which its engine follows.
    assert by["self-int4"].plan.acceptance["source"] == "measured" and by["self-int4"].plan.draft.is_self_draft
    assert by["self-int4"].plan.path != by[str(draft)].plan.path
    assert Engine.from_pretrained(target, draft="self-int4", group_size=32, dtype="float32").plans == \
        [by["self-int4"].plan]
    assert found.best.tokens_per_s == max(o.tokens_per_s for o in found.options if o.tokens_per_s is not None)


def test_the_draft_flag_takes_a_self_draft(checkpoints):
    """chat, batch and serve share add_model_args / load_engine: --draft self-int8 --group-size 32 reaches the engine."""
    from offload_runtime.cli import ArgumentParser, add_model_args, add_sampling_args, load_engine

    p = ArgumentParser()
    add_model_args(p)
    add_sampling_args(p)
    args = p.parse_args(["--model", str(checkpoints["llama-mha"]), "--draft", "self-int8", "--group-size", "32",
                         "--dtype", "float32", "--device", "cpu", "--plan", "none"])
    engine = load_engine(args)
    _, dw = next(engine.draft.layers.sweep())
    assert dw["mlp.gate_up_proj.qweight"].dtype == torch.int8 and dw["mlp.gate_up_proj.scales"].shape == (64 // 32, 2 * 96)
    assert engine.draft.globals is engine.target.globals
