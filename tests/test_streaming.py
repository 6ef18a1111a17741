"""Layer streaming on the CPU: the same scheduler as on CUDA, with real copies into staging slots."""
import textwrap

import pytest
import torch

from helpers import make_checkpoint, peak_private_growth
from offload_runtime.weights import store
from offload_runtime.weights.layout import layer_bytes
from offload_runtime import Engine
from offload_runtime.errors import ResourceError
from offload_runtime.residency import choose_residency, spread
from offload_runtime.memory import parse_bytes
from offload_runtime.streaming import StreamedLayers
from offload_runtime.model.config import ModelArgs


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """Six layers, so 'some resident' has room on both sides."""
    return make_checkpoint(tmp_path_factory.mktemp("deep") / "m", "llama-gqa-llama3", num_hidden_layers=6, seed=3)


def logits_and_tokens(engine, ids):
    result = engine.generate(ids, max_new_tokens=12, temperature=0, ignore_eos=True)[0]
    from offload_runtime.model.batch import RowChunk, build_forward
    from offload_runtime.model.kv_cache import KVCache
    from offload_runtime.model.tree import Tree

    cache = KVCache(engine.target.args, 1, 64, engine.target.dtype, "cpu")
    batch = build_forward([RowChunk(0, Tree.chain(len(ids)), ids, range(len(ids)), range(len(ids)))],
                          cache.scratch_slot, None, "cpu")
    return engine.target.forward(batch, cache), result.token_ids


@pytest.mark.parametrize("slots", [2, 3])
@pytest.mark.parametrize("resident", [0, 2, 6])
def test_streamed_equals_resident_bitwise(deep, slots, resident):
    ids = [3, 17, 44, 9, 81, 5, 60]
    base = Engine.from_pretrained(deep, dtype="float32", draft=False, offload=False)
    streamed = Engine.from_pretrained(deep, dtype="float32", draft=False, offload=True, slots=slots,
                                      resident_layers=resident)
    assert streamed.offloaded and len(streamed.residency.resident) == resident
    want_logits, want_tokens = logits_and_tokens(base, ids)
    got_logits, got_tokens = logits_and_tokens(streamed, ids)
    assert torch.equal(got_logits, want_logits)
    assert got_tokens == want_tokens
    sweeps = streamed.sweep_stats()
    assert len(sweeps) == 13 and all(s.layers == 6 - resident for s in sweeps)
    layer_bytes = streamed.target.layers.store.layer_bytes
    if 6 - resident > slots:  # every streamed layer really moves, every sweep
        assert all(s.bytes == (6 - resident) * layer_bytes for s in sweeps)


def test_slots_cycle_across_sweeps(deep):
    """Load t goes to slot t % K; the next sweep's first layers are loaded when the previous sweep ends."""
    engine = Engine.from_pretrained(deep, dtype="float32", draft=False, offload=True, slots=2, resident_layers=2)
    layers: StreamedLayers = engine.target.layers
    streamed = layers.streamed
    assert streamed == [0, 2, 3, 5]  # spread(6, 2) keeps 1 and 4
    assert layers.slot_layer == [0, 2]  # the first sweep's first two, loaded at construction
    seen = [i for i, _ in layers.sweep()]
    assert seen == list(range(6))
    assert layers.slot_layer == [0, 2] and layers._issued == 6  # already holding the next sweep's first two


def test_speculative_decoding_with_streaming(deep, checkpoints):
    ids = [3, 17, 44, 9]
    plain = Engine.from_pretrained(deep, dtype="float64", draft=False, offload=False)
    spec = Engine.from_pretrained(deep, dtype="float64", draft=str(checkpoints["llama-gqa-llama3"]),
                                  tree=[-1, 0, 0, 1, 2, 3], offload=True, resident_layers=1)
    a = plain.generate(ids, max_new_tokens=30, temperature=0, ignore_eos=True)[0].token_ids
    b = spec.generate(ids, max_new_tokens=30, temperature=0, ignore_eos=True)[0].token_ids
    assert a == b


def test_budget_decides_offload_and_resident_layers(deep):
    args = ModelArgs.from_file(deep)
    layer = layer_bytes(args, torch.float32)
    fixed = {"embeddings and head": 1000, "staging slots": 2 * layer}
    r = choose_residency(args, torch.float32, torch.device("cpu"), offload=None, budget_bytes=1000 + 6 * layer,
                         fixed=fixed, slots=2)
    assert not r.offload and r.resident == tuple(range(6))
    r = choose_residency(args, torch.float32, torch.device("cpu"), offload=None, budget_bytes=1000 + 5 * layer,
                         fixed=fixed, slots=2)
    assert r.offload and len(r.resident) == 3  # 5 layers of room, 2 of them staging slots
    r = choose_residency(args, torch.float32, torch.device("cpu"), offload=None, budget_bytes=None, fixed=fixed,
                         slots=2)
    assert not r.offload
    with pytest.raises(ResourceError, match="not enough GPU memory"):
        choose_residency(args, torch.float32, torch.device("cuda"), offload=True, budget_bytes=1000 + layer,
                         fixed=fixed, slots=2)
    with pytest.raises(ResourceError, match="too small to stream this model on the CPU"):  # no GPU to speak of
        choose_residency(args, torch.float32, torch.device("cpu"), offload=True, budget_bytes=1000 + layer,
                         fixed=fixed, slots=2)
    assert spread(80, 4) == (10, 30, 50, 70) and spread(5, 0) == ()
    assert parse_bytes("20GiB") == 20 * 2**30 and parse_bytes("1.5GB") == 1_500_000_000


def test_engine_offloads_when_budget_is_small(deep):
    from offload_runtime.residency import fixed_device_bytes

    args = ModelArgs.from_file(deep)
    fixed = fixed_device_bytes(args, torch.float32, draft_args=None, batch=1, max_seq_len=64, tree_size=1,
                               max_chunk=64, slots=2, on_cuda=False)
    layer = layer_bytes(args, torch.float32)
    engine = Engine.from_pretrained(deep, dtype="float32", draft=False, max_seq_len=64, max_chunk=64,
                                    gpu_memory=sum(fixed.values()) + int(3.5 * layer))
    assert engine.offloaded and engine.residency.resident == spread(6, 3)


def test_too_little_ram_is_a_clear_error_before_allocating(deep, monkeypatch):
    monkeypatch.setenv("OFFLOAD_RUNTIME_MAX_HOST_MEMORY", "10000")

    def no_alloc(*a, **k):
        raise AssertionError("allocated host memory despite the RAM check")

    monkeypatch.setattr(store, "alloc_host", no_alloc)
    # max_seq_len 8: KV caches that fit, so the weights are what the check refuses
    with pytest.raises(ResourceError, match=r"streaming m .* needs .* of host RAM but only 9.8 KiB is available"):
        Engine.from_pretrained(deep, dtype="float32", draft=False, offload=True, max_seq_len=8)
    with pytest.raises(ResourceError, match=r"loading m .* needs .* of host RAM"):
        Engine.from_pretrained(deep, dtype="float32", draft=False, offload=False, max_seq_len=8)


def test_peak_rss_while_loading_stays_near_checkpoint_size(tmp_path):
    path = make_checkpoint(tmp_path / "big", "llama-mha", hidden_size=384, intermediate_size=1024,
                           num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6, vocab_size=4096)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert size > 40e6
    setup = textwrap.dedent(f"""
        from offload_runtime import Engine
        from offload_runtime.weights.checkpoint import Checkpoint
        Checkpoint({str(path)!r})  # warm imports and code paths outside the measurement
    """)
    measured = textwrap.dedent(f"""
        engine = Engine.from_pretrained({str(path)!r}, dtype="float32", draft=False, offload=True,
                                        resident_layers=0, max_seq_len=16, progress=False)
    """)
    grown = peak_private_growth(setup, measured)["grown"]
    # 1.25 x S covers the store (S), the two staging slots and the globals; 16 MB for allocator slack.
    assert grown < 1.25 * size + 16e6, (grown, size)


def test_the_peak_memory_probe_sees_a_transient_copy():
    """The probe the peak-memory tests use: 100 MB held for 10 ms and freed before the end is seen; nothing is not."""
    transient = peak_private_growth("import time, torch", "x = torch.ones(25_000_000)\ntime.sleep(0.01)\ndel x")
    idle = peak_private_growth("import time, torch", "time.sleep(0.01)")
    assert transient["grown"] > 95e6 and idle["grown"] < 5e6, (transient, idle)
