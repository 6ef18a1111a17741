"""Quantized models: AWQ and GPTQ checkpoints as the tools write them, quantize on load, exactness against
transformers running the quantized model's own weights, streaming, bytes, bad input."""
import json
import shutil

import pytest
import torch

from helpers import make_checkpoint, make_tokenizer, make_truncated_draft
from quant_helpers import (QuantCase, dequantized, make_quantized_checkpoint, pack_awq, pack_gptq_zeros,
                           random_linear_ints, reference_from_state)
from offload_runtime import Engine
from offload_runtime.errors import CheckpointError, ConfigError, UsageError
from offload_runtime.model.batch import RowChunk, build_forward
from offload_runtime.model.config import ModelArgs
from offload_runtime.model.kv_cache import KVCache
from offload_runtime.model.quantization import (KernelChoice, QuantSpec, dequantize, exact_kernel_choice,
                                                kernel_applies, kernel_block, pack_int4, quantized_linear,
                                                stored_linears, unpack_int4)
from offload_runtime.model.tree import Tree
from offload_runtime.weights import quantized
from offload_runtime.weights.checkpoint import Checkpoint
from offload_runtime.weights.layout import layer_bytes
from offload_runtime.weights.quantized import pack_linear, quantize_rtn, unpack_awq, unpack_gptq

CASES = [QuantCase("awq", group_size=32), QuantCase("awq", group_size=-1),
         QuantCase("gptq", bits=4, group_size=32, sym=True), QuantCase("gptq", bits=4, group_size=32),
         QuantCase("gptq", bits=4, group_size=32, desc_act=True), QuantCase("gptq", bits=8, group_size=32),
         QuantCase("gptq", bits=8, group_size=-1, sym=True), QuantCase("gptq", bits=4, group_size=32, v1=False),
         QuantCase("gptq", bits=8, group_size=32, desc_act=True, v1=False)]


def logits(engine, ids):
    cache = KVCache(engine.target.args, 1, 64, engine.target.dtype, "cpu")
    batch = build_forward([RowChunk(0, Tree.chain(len(ids)), ids, range(len(ids)), range(len(ids)))],
                          cache.scratch_slot, None, "cpu")
    return engine.target.forward(batch, cache)[0]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


IDS = [3, 17, 44, 9, 81, 5, 60, 22, 7]


# --- unpacking against the tools' layouts


def test_awq_word_holds_columns_in_interleaved_order():
    """A known answer: columns 0..7 holding 1..8 pack into nibbles [1, 3, 5, 7, 2, 4, 6, 8] (low first)."""
    cols = torch.arange(1, 9, dtype=torch.int32)[None]
    word = pack_awq(cols.numpy())
    assert int(word) & 0xFFFFFFFF == 0x86427531
    ints = unpack_awq(word.expand(1, 1).contiguous(), word.clone(), torch.ones(1, 8, dtype=torch.float16))
    assert ints.q[:, 0].tolist() == list(range(1, 9)) and ints.zeros[0].tolist() == list(range(1, 9))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_unpacking_equals_the_tools_integers(case):
    g = torch.Generator().manual_seed(1)
    N, K = 64, 96
    q, z, s, g_idx = random_linear_ints(N, K, case, g)
    if case.method == "awq":
        ints = unpack_awq(pack_awq(q.t().numpy()), pack_awq(z.numpy()), s)
    else:
        from quant_helpers import pack_gptq_rows
        ints = unpack_gptq(pack_gptq_rows(q.t().numpy(), case.bits), pack_gptq_zeros(z.numpy(), case.bits, case.v1),
                           s, g_idx, case.bits, 1 if case.v1 else 0)
    assert torch.equal(ints.q.long(), q) and torch.equal(ints.zeros.long(), z)
    spec = QuantSpec(case.bits, case.group_size, act_order=case.desc_act, block=32)
    packed = pack_linear(ints, spec)
    got = dequantize({f"l.{k}": v for k, v in packed.items()}, "l", case.bits, torch.float64)
    assert torch.equal(got, dequantized(q, z, s, g_idx))  # bit for bit


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,block", [(4, 32), (4, 64), (8, None)])
def test_dequantize_rounds_the_exact_weight_once_in_every_layout_and_dtype(bits, block, act_order):
    """Every int4 block layout (a one-block layout unpacks to a transposed view, the others to rows) and int8, with
    and without act-order, into each float dtype: the exact (q - z) s rounded once, in the memory order of the
    unpacked integers."""
    g = torch.Generator().manual_seed(9)
    N, K = 64, 96
    q, z, s, g_idx = random_linear_ints(N, K, QuantCase("gptq", bits=bits, group_size=32, desc_act=act_order), g)
    ints = quantized.LinearInts(q, z.to(torch.int16), s, g_idx if act_order else None)
    w = {f"l.{k}": v for k, v in pack_linear(ints, QuantSpec(bits, 32, act_order, block)).items()}
    exact = dequantized(q, z, s, g_idx)
    one_block = block == N  # qweight [1, K, N / 2]
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        got = dequantize(w, "l", bits, dtype)
        assert got.dtype == dtype and torch.equal(got, exact.to(dtype)), dtype
        assert got.t().is_contiguous() if one_block else got.is_contiguous()
        # quantized_linear's form: the same bits in this thread's scratch buffers, reused by the next call
        again = dequantize(w, "l", bits, dtype, reuse=True)
        assert torch.equal(again, got) and again.stride() == got.stride()
        assert dequantize(w, "l", bits, dtype, reuse=True).data_ptr() == again.data_ptr()
    # A fresh thread's pool, first filled inside inference mode (as a forward does), serves calls outside it too.
    import threading
    outside = []

    def first_in_inference_mode():
        with torch.inference_mode():
            dequantize(w, "l", bits, torch.bfloat16, reuse=True)
        outside.append(dequantize(w, "l", bits, torch.bfloat16, reuse=True).clone())

    thread = threading.Thread(target=first_in_inference_mode)
    thread.start()
    thread.join()
    assert len(outside) == 1 and torch.equal(outside[0], exact.to(torch.bfloat16))


def test_wrong_awq_nibble_order_is_caught(monkeypatch):
    """The check above fails when the reader takes AWQ's nibbles in plain order."""
    g = torch.Generator().manual_seed(2)
    q, z, s, _ = random_linear_ints(64, 64, QuantCase("awq"), g)
    monkeypatch.setattr(quantized, "AWQ_ORDER", tuple(range(8)))
    ints = unpack_awq(pack_awq(q.t().numpy()), pack_awq(z.numpy()), s)
    assert not torch.equal(ints.q.long(), q)


def test_wrong_gptq_zero_offset_is_caught():
    """v1 read as v2 (no +1) gives zero points off by one, and the reverse too."""
    g = torch.Generator().manual_seed(3)
    case = QuantCase("gptq", bits=4)
    q, z, s, g_idx = random_linear_ints(64, 64, case, g)
    from quant_helpers import pack_gptq_rows
    qweight = pack_gptq_rows(q.t().numpy(), 4)
    v1 = unpack_gptq(qweight, pack_gptq_zeros(z.numpy(), 4, v1=True), s, g_idx, 4, zero_offset=0)
    assert torch.equal(v1.zeros.long(), z - 1)
    v2 = unpack_gptq(qweight, pack_gptq_zeros(z.numpy(), 4, v1=False), s, g_idx, 4, zero_offset=1)
    assert torch.equal(v2.zeros.long(), z + 1)


def test_int4_packing_round_trips_and_matches_the_cpu_kernel_layout():
    from offload_runtime.model.quantization import cpu_int4_block

    q = torch.randint(0, 16, (192, 64), generator=torch.Generator().manual_seed(4), dtype=torch.int32)
    for block in (32, 64, 192):
        assert torch.equal(unpack_int4(pack_int4(q, block)).int(), q)
    block = cpu_int4_block()
    if block is not None:  # the kernel reads our bytes as they are
        ours = pack_int4(q, block).reshape(-1)
        assert torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1).reshape(-1), ours)


# --- whole checkpoints against transformers


@pytest.fixture(scope="module")
def quant_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for i, case in enumerate(CASES):
        config = "qwen2-bias" if case.bits == 8 else "llama-mha"  # biases beside packed weights too
        path, state = make_quantized_checkpoint(root / case.name, config, case, seed=20 + i)
        make_tokenizer(path, 128)
        out[case.name] = (path, state, config)
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_quantized_checkpoint_equals_transformers_running_its_weights(quant_ckpts, case):
    path, state, config = quant_ckpts[case.name]
    assert ModelArgs.from_file(path).quantization.method == case.method
    ref = reference_from_state(config, state)
    with torch.no_grad():
        expected = ref(torch.tensor([IDS])).logits[0]
    assert expected.abs().max() > 0.1
    engine = Engine.from_pretrained(path, dtype="float64", draft=False)
    assert rel_err(logits(engine, IDS), expected) < 1e-10
    engine32 = Engine.from_pretrained(path, dtype="float32", draft=False)
    assert rel_err(logits(engine32, IDS), expected) < 1e-4
    ref.generation_config.eos_token_id = None
    want = ref.generate(torch.tensor([IDS]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, len(IDS):]
    got = engine.generate(IDS, max_new_tokens=16, temperature=0, ignore_eos=True)[0].token_ids
    assert got == want.tolist()


def test_awq_read_in_plain_order_no_longer_matches(quant_ckpts, monkeypatch):
    """The end-to-end comparison fails on a reader with the wrong nibble order."""
    path, state, config = quant_ckpts["awq-g32"]
    with torch.no_grad():
        expected = reference_from_state(config, state)(torch.tensor([IDS])).logits[0]
    monkeypatch.setattr(quantized, "AWQ_ORDER", tuple(range(8)))
    assert rel_err(logits(Engine.from_pretrained(path, dtype="float64", draft=False), IDS), expected) > 1e-3


def test_gptq_v1_read_as_v2_no_longer_matches(quant_ckpts, tmp_path):
    path, state, config = quant_ckpts["gptq-4b-g32-asym-v1"]
    import shutil

    wrong = shutil.copytree(path, tmp_path / "as-v2")
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (wrong / "config.json").write_text(json.dumps(cfg))
    with torch.no_grad():
        expected = reference_from_state(config, state)(torch.tensor([IDS])).logits[0]
    assert rel_err(logits(Engine.from_pretrained(wrong, dtype="float64", draft=False), IDS), expected) > 1e-3


# --- quantize on load


# 2 and 4: small groups, often of one sign
@pytest.mark.parametrize("bits,group", [(4, 128), (4, 32), (8, 32), (8, -1), (4, -1), (8, 2), (4, 4)])
def test_rtn_quantization_is_nearest_on_its_grid(bits, group):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(5)) * 0.05
    ints = quantize_rtn(w, bits, group, rows=24)  # several row chunks
    g = 256 if group == -1 else group
    idx = torch.arange(256) // g
    wq = dequantized(ints.q.long(), ints.zeros.long(), ints.scales, idx.int())
    step = ints.scales.double().t()[:, idx]
    assert int(ints.q.max()) <= 2 ** bits - 1
    err = (wq - w.double()).abs() / step
    # Half a step inside the range; the rounded zero point can shift the grid by up to half a step, so the
    # group's extremes may be a step away.
    assert float(err.max()) <= 1 + 1e-6 and float((err <= 0.5 + 1e-6).double().mean()) > 0.97


@pytest.mark.parametrize("quantize,group", [("int4", 32), ("int8", 32), ("int4", -1)])
def test_quantize_on_load_equals_transformers_running_the_quantized_weights(checkpoints, quantize, group):
    path = checkpoints["llama-gqa-llama3"]
    engine = Engine.from_pretrained(path, dtype="float64", draft=False, quantize=quantize, group_size=group)
    # The quantized model's weights, read back from the engine's own packed layers.
    state = {}
    from safetensors.torch import load_file
    for name, t in load_file(path / "model.safetensors").items():
        state[name] = t.double()
    bits = int(quantize[-1])
    for i, w in engine.target.layers.sweep():
        for name in [n.removesuffix(".qweight") for n in w if n.endswith(".qweight")]:
            # A stacked linear (q/k/v, gate/up) splits back into its parts' rows, in stored_linears' order.
            parts = stored_linears(QuantSpec(bits, group))[name]
            rows = [engine.target.args.layer_shapes()[f"{p}.weight"][0] for p in parts]
            for p, weight in zip(parts, dequantize(w, name, bits, torch.float64).split(rows)):
                state[f"model.layers.{i}.{p}.weight"] = weight
                assert f"{p}.weight" not in w
    ref = reference_from_state("llama-gqa-llama3", state, num_hidden_layers=3)
    with torch.no_grad():
        expected = ref(torch.tensor([IDS])).logits[0]
    assert rel_err(logits(engine, IDS), expected) < 1e-10
    plain = Engine.from_pretrained(path, dtype="float64", draft=False)
    assert rel_err(logits(plain, IDS), expected) > 1e-6  # really quantized


@pytest.mark.parametrize("temperature", [0.0])
def test_greedy_speculative_equals_plain_for_quantized_target_and_draft(tiny_pair, temperature):
    target, draft = tiny_pair
    ids = [3, 17, 44, 9]
    plain = Engine.from_pretrained(target, dtype="float64", draft=False, quantize="int4", group_size=32)
    spec = Engine.from_pretrained(target, dtype="float64", draft=str(draft), quantize="int4", group_size=32,
                                  draft_quantize="int4", tree=[-1, 0, 0, 1, 1, 2, 3], plan=None)
    a = plain.generate(ids, max_new_tokens=40, temperature=0, ignore_eos=True)[0]
    b = spec.generate(ids, max_new_tokens=40, temperature=0, ignore_eos=True)[0]
    assert a.token_ids == b.token_ids
    assert b.stats.steps < 40  # the quantized draft still gets tokens accepted
    unquantized = Engine.from_pretrained(target, dtype="float64", draft=False)
    assert unquantized.generate(ids, max_new_tokens=40, temperature=0, ignore_eos=True)[0].token_ids != a.token_ids \
        or rel_err(logits(unquantized, ids), logits(plain, ids)) > 1e-6


def test_greedy_speculative_equals_plain_for_an_awq_target(quant_ckpts, tiny_pair):
    path, _, _ = quant_ckpts["awq-g32"]
    _, draft = tiny_pair
    ids = [3, 17, 44, 9]
    plain = Engine.from_pretrained(path, dtype="float64", draft=False)
    spec = Engine.from_pretrained(path, dtype="float64", draft=str(draft), tree=[-1, 0, 0, 1, 2], plan=None)
    assert plain.generate(ids, max_new_tokens=30, temperature=0, ignore_eos=True)[0].token_ids == \
        spec.generate(ids, max_new_tokens=30, temperature=0, ignore_eos=True)[0].token_ids


# --- streaming: one code path for every format


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Six layers with widths the CPU int4 kernel takes (multiples of 64), so its path is exercised too."""
    return make_checkpoint(tmp_path_factory.mktemp("wide") / "m", "llama-mha", hidden_size=128,
                           intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
                           num_key_value_heads=2, seed=8)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("slots", [2, 3])
@pytest.mark.parametrize("resident", [0, 2, 6])
def test_quantized_streamed_equals_resident_bitwise(wide, dtype, slots, resident):
    kw = dict(dtype=dtype, draft=False, quantize="int4", group_size=64)
    base = Engine.from_pretrained(wide, offload=False, **kw)
    streamed = Engine.from_pretrained(wide, offload=True, slots=slots, resident_layers=resident, **kw)
    assert streamed.offloaded and len(streamed.residency.resident) == resident
    assert base.target.kernel == streamed.target.kernel  # one measured choice per process and shape
    assert torch.equal(logits(streamed, IDS), logits(base, IDS))
    a = base.generate(IDS, max_new_tokens=10, temperature=0, ignore_eos=True)[0].token_ids
    assert streamed.generate(IDS, max_new_tokens=10, temperature=0, ignore_eos=True)[0].token_ids == a
    args = streamed.target.args
    per_layer = layer_bytes(args, streamed.target.dtype, QuantSpec(4, 64))
    assert streamed.target.layers.store.layer_bytes == per_layer
    if 6 - resident > slots:
        assert all(s.bytes == (6 - resident) * per_layer for s in streamed.sweep_stats())


def test_int4_kernel_and_dequantize_agree_and_both_run(wide):
    """Both paths of the use step on the same packed layer: equal up to float32 rounding."""
    kw = dict(dtype="float32", draft=False, quantize="int4", group_size=64)
    engine = Engine.from_pretrained(wide, **kw)
    _, w = next(engine.target.layers.sweep())
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(6))
    kernel = quantized_linear(x, w, "mlp.gate_up_proj", KernelChoice(1 << 20))
    dequant = quantized_linear(x, w, "mlp.gate_up_proj", KernelChoice(0))
    assert rel_err(kernel, dequant) < 1e-5
    from offload_runtime.model.quantization import cpu_int4_block, kernel_applies
    assert kernel_applies(w, "mlp.gate_up_proj", 4, x) == (cpu_int4_block() is not None)


@pytest.mark.parametrize("bits,group", [(4, 64), (8, -1), (8, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_stacked_linear_is_its_parts_side_by_side(bits, group, dtype):
    """q/k/v (and gate/up) are stored as one packed linear (stored_linears): its output is each part's output
    side by side, in order. By the int kernels bit for bit (every output column is its own dot product); by
    dequantize + matmul up to rounding, as the matmul's blocking follows the width, which is why a layer holds
    only the stacked form and plain and speculative decoding both use it."""
    from offload_runtime.model.quantization import cpu_int4_block, kernel_applies, kernel_extras
    from offload_runtime.weights.quantized import stack_ints

    g = torch.Generator().manual_seed(11)
    K = 256
    spec = QuantSpec(bits, group, block=cpu_int4_block())
    parts = [quantize_rtn(torch.randn(n, K, generator=g), bits, group) for n in (128, 64, 64)]

    def layer(ints, name):
        w = {f"{name}.{k}": v for k, v in pack_linear(ints, spec).items()}
        return {**w, **kernel_extras(w, dtype)}

    stacked = layer(stack_ints(parts), "qkv")
    alone = [layer(p, f"part{i}") for i, p in enumerate(parts)]
    for tokens in (1, 5):
        x = torch.randn(tokens, K, generator=g).to(dtype)
        for choice in (KernelChoice(1 << 20), KernelChoice(0)):
            got = quantized_linear(x, stacked, "qkv", choice)
            want = torch.cat([quantized_linear(x, w, f"part{i}", choice) for i, w in enumerate(alone)], dim=-1)
            if choice.max_tokens and kernel_applies(stacked, "qkv", bits, x):
                assert torch.equal(got, want), (tokens, choice)
            else:
                assert rel_err(got, want) < (1e-2 if dtype == torch.bfloat16 else 1e-6), (tokens, choice)


def test_layers_hold_stacked_linears_but_act_order_ones_apart():
    from offload_runtime.model.quantization import LINEARS, stored_linears
    from offload_runtime.weights.layout import layer_layout

    args = ModelArgs.from_name("tiny")
    lay = layer_layout(args, torch.bfloat16, QuantSpec(4, 16))
    held = [n.removesuffix(".qweight") for n in lay.slots if n.endswith(".qweight")]
    assert held == list(stored_linears(QuantSpec(4, 16))) == ["self_attn.qkv_proj", "self_attn.o_proj",
                                                             "mlp.gate_up_proj", "mlp.down_proj"]
    assert lay.slots["self_attn.qkv_proj.scales"].shape == (args.dim // 16, args.q_size + 2 * args.kv_size)
    assert lay.slots["mlp.gate_up_proj.zeros"].shape == (args.dim // 16, 2 * args.intermediate_size)
    # Act-order linears each have their own g_idx: they stay apart (and so does the kernel, which takes none).
    act = layer_layout(args, torch.bfloat16, QuantSpec(4, 16, act_order=True))
    assert [n.removesuffix(".qweight") for n in act.slots if n.endswith(".qweight")] == list(LINEARS)


def test_auto_dtype_on_the_cpu_is_bf16_only_where_the_int4_kernel_and_native_bf16_are(wide):
    """float32 for float and int8 weights (16-bit matmuls are slow on most CPUs); bf16 for int4 weights the kernel
    reads, where oneDNN has native bf16; an explicit dtype always wins. Both the engine and the planner ask it."""
    from offload_runtime.api.options import cpu_has_native_bf16, parse_dtype
    from offload_runtime.model.quantization import cpu_int4_block

    cpu = torch.device("cpu")
    fast = torch.bfloat16 if cpu_int4_block() and cpu_has_native_bf16() else torch.float32
    assert parse_dtype(None, cpu, "bfloat16") == torch.float32
    assert parse_dtype("auto", cpu, "bfloat16", QuantSpec(4, 32)) == fast
    assert parse_dtype(None, cpu, None, QuantSpec(8, 32)) == torch.float32
    assert parse_dtype(None, cpu, None, QuantSpec(4, 32, act_order=True)) == torch.float32  # no kernel for g_idx
    assert parse_dtype("float32", cpu, None, QuantSpec(4, 32)) == torch.float32
    assert Engine.from_pretrained(wide, draft=False, quantize="int4", group_size=64).target.dtype == fast
    assert Engine.from_pretrained(wide, draft=False).target.dtype == torch.float32


def test_kernel_extras_only_where_the_kernel_applies():
    """A resident layer's `.kernel_sz` lets quantized_linear skip its checks, so it must exist only for linears
    the int4 kernel can compute: none for act-order (g_idx) linears or for 8-bit ones."""
    from offload_runtime.model.quantization import cpu_int4_block, kernel_extras

    g = torch.Generator().manual_seed(12)
    ints = quantize_rtn(torch.randn(64, 128, generator=g), 4, 64)
    plain = {f"l.{k}": v for k, v in pack_linear(ints, QuantSpec(4, 64, block=cpu_int4_block())).items()}
    act = {f"l.{k}": v for k, v in pack_linear(ints, QuantSpec(4, 64, act_order=True,
                                                               block=cpu_int4_block())).items()}
    int8 = {f"l.{k}": v for k, v in pack_linear(quantize_rtn(torch.randn(64, 128, generator=g), 8, -1),
                                                QuantSpec(8, -1)).items()}
    assert list(kernel_extras(plain, torch.bfloat16)) == (["l.kernel_sz"] if cpu_int4_block() else [])
    assert kernel_extras(act, torch.bfloat16) == {} and kernel_extras(int8, torch.bfloat16) == {}


# --- bytes


def test_layer_bytes_follow_the_format():
    args = ModelArgs.from_name("llama-2-70b")
    fp16 = layer_bytes(args, torch.float16)
    int4 = layer_bytes(args, torch.float16, QuantSpec(4, 128))
    int8 = layer_bytes(args, torch.float16, QuantSpec(8, 128))
    assert fp16 == pytest.approx(1.71e9, rel=0.01)
    assert int4 / fp16 == pytest.approx(0.26, abs=0.01) and int4 == pytest.approx(0.45e9, rel=0.02)
    assert int8 / fp16 == pytest.approx(0.51, abs=0.01)


def test_draft_quantization_counts_in_the_device_budget():
    from offload_runtime.residency import fixed_device_bytes

    target, draft = ModelArgs.from_name("llama-2-70b"), ModelArgs.from_name("llama-3-8b")
    kw = dict(draft_args=draft, batch=1, max_seq_len=2048, tree_size=256, max_chunk=2048, slots=2, on_cuda=True)
    fp = fixed_device_bytes(target, torch.float16, **kw)
    q = fixed_device_bytes(target, torch.float16, quant=QuantSpec(4, 128), draft_quant=QuantSpec(4, 128), **kw)
    assert fp["draft"] == pytest.approx(16e9, rel=0.05) and q["draft"] < 0.4 * fp["draft"]
    assert q["staging slots"] == 2 * layer_bytes(target, torch.float16, QuantSpec(4, 128))
    assert q["dequantize scratch"] == 28672 * 8192 * 6 and "dequantize scratch" not in fp


# --- bad input


def _write_config(path, **quantization_config):
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {**cfg["quantization_config"], **quantization_config}
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("field,value,message", [
    ("quant_method", "bitsandbytes", r"quant_method 'bitsandbytes' is not supported; supported: awq, gptq"),
    ("bits", 3, r"quantization_config\.bits 3 is not supported for GPTQ; supported: 4, 8"),
    ("group_size", 48, r"quantization_config\.group_size 48 does not divide the input width"),
    ("group_size", 0, r"quantization_config\.group_size 0 is not supported"),
    ("checkpoint_format", "marlin", r"quantization_config\.checkpoint_format 'marlin' \(GPTQ\) is not supported"),
])
def test_unsupported_quantization_config_names_the_field(quant_ckpts, tmp_path, field, value, message):
    import shutil

    path = shutil.copytree(quant_ckpts["gptq-4b-g32-asym-v1"][0], tmp_path / "m")
    _write_config(path, **{field: value})
    with pytest.raises(ConfigError, match=message):
        Engine.from_pretrained(path, draft=False)


def test_unsupported_awq_version_names_the_field(quant_ckpts, tmp_path):
    import shutil

    path = shutil.copytree(quant_ckpts["awq-g32"][0], tmp_path / "m")
    _write_config(path, version="gemv")
    with pytest.raises(ConfigError, match=r"quantization_config\.version 'gemv' \(AWQ\) is not supported; "
                                          r"supported: gemm"):
        Engine.from_pretrained(path, draft=False)


@pytest.mark.parametrize("tensor,change", [("qweight", "drop"), ("qzeros", "drop"), ("scales", "drop"),
                                           ("qweight", "shape"), ("scales", "shape"), ("qzeros", "float")])
def test_missing_or_misshapen_packed_tensors_are_named(quant_ckpts, tmp_path, tensor, change):
    import shutil

    from safetensors.torch import load_file, save_file

    path = shutil.copytree(quant_ckpts["awq-g32"][0], tmp_path / "m")
    state = load_file(path / "model.safetensors")
    name = f"model.layers.1.mlp.up_proj.{tensor}"
    if change == "drop":
        del state[name]
    elif change == "shape":
        state[name] = state[name][:-1].contiguous()
    else:
        state[name] = state[name].float()
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        Engine.from_pretrained(path, draft=False)


def test_quantize_options_are_checked(quant_ckpts, checkpoints):
    awq = quant_ckpts["awq-g32"][0]
    with pytest.raises(UsageError, match=r"already quantized \(awq int4-g32\); drop --quantize"):
        Engine.from_pretrained(awq, draft=False, quantize="int4")
    plain = checkpoints["llama-mha"]
    with pytest.raises(UsageError, match=r"quantize 'int3' is not supported; use one of int8, int4"):
        Engine.from_pretrained(plain, draft=False, quantize="int3")
    with pytest.raises(UsageError, match=r"group_size \(--group-size\) needs quantize"):
        Engine.from_pretrained(plain, draft=False, group_size=64)
    with pytest.raises(UsageError, match=r"group_size 48 does not divide"):
        Engine.from_pretrained(plain, draft=False, quantize="int4", group_size=48)
    with pytest.raises(UsageError, match=r"draft_quantize \(--draft-quantize\) needs a draft"):
        Engine.from_pretrained(plain, draft=False, draft_quantize="int4")


# --- planner


def test_profile_plans_with_packed_bytes_and_times_the_chosen_kernels(quant_ckpts):
    from planner import optimizer as opt
    from planner import profile as prof

    args = ModelArgs.from_name("tiny").replace(dim=128, intermediate_size=256, n_heads=4, n_kv_heads=2, head_dim=32)
    spec = QuantSpec(4, 64)
    p = prof.run_profile(args, args, torch.device("cpu"), torch.float32, grid=[1, 2, 4], effort=prof.Effort.quick(),
                         quant=spec, draft_quant=spec)
    assert p["layer_bytes"] == layer_bytes(args, torch.float32, spec) < layer_bytes(args, torch.float32) / 3
    assert p["quant"] == "int4-g64" and p["draft_quant"] == "int4-g64"
    from offload_runtime.model.quantization import cpu_int4_block
    if cpu_int4_block() is not None:
        k = p["quant_kernel"]
        assert k["max_tokens"] in k["grid"] + [0] and len(k["kernel_s"]) == len(k["dequant_s"]) >= 1
        # In bfloat16 the engine runs the kernel at every token count (exact_kernel_choice): so do the curves.
        bf16 = prof.run_profile(args, None, torch.device("cpu"), torch.bfloat16, grid=[1, 2],
                                effort=prof.Effort.quick(), quant=spec)
        assert bf16["quant_kernel"]["max_tokens"] >= 1 << 30
    # An AWQ checkpoint's own format is planned for without being asked.
    awq = ModelArgs.from_file(quant_ckpts["awq-g32"][0])
    r = opt.residency(awq, torch.float16, torch.device("cpu"), draft=None, budget_bytes=10**9, batch=1,
                      max_seq_len=64, max_tree=8, offload=True)
    assert r.budget.layer_bytes == layer_bytes(awq, torch.float16, awq.quantization.spec())
    assert prof.profile_path("m", torch.device("cpu"), torch.float16, awq, None).name.endswith("int4-g32-fp.json")


# --- the benchmark tool (asserting on its returned data)


def test_bench_quant_projection_and_sweep_bytes():
    from helpers import load_tool

    bench, projection = load_tool("bench_quant"), load_tool("project_70b")
    fp, q = (projection.project(25.0, 22.0, 80.0, 900.0, projection.DEFAULT_ACCEPTANCE, s, max_tree=128)
             for s in projection.SCENARIOS[1:3])
    assert q["stream_s"] == pytest.approx((80 - q["resident_layers"]) * q["layer_bytes"] / 25e9)
    assert q["layer_bytes"] < 0.27 * fp["layer_bytes"] and q["resident_layers"] > fp["resident_layers"]
    assert fp["s_per_token"] > 3 * q["s_per_token"]
    rows = {row["format"]: row for row in bench.bytes_and_sweeps("tiny", bench.QUICK, repeats=1, new_tokens=8)}
    assert rows["int4 g128"]["bytes_vs_bf16"] < 0.3 and 0.45 < rows["int8 g128"]["bytes_vs_bf16"] < 0.55
    assert rows["int4 g128"]["bytes_per_sweep"] == 4 * rows["int4 g128"]["layer_bytes"]
    assert bench.fmt("int4 g", bench.SMOLLM2_135M)[0] == "int4 g64"  # 576 is not a multiple of 128


def test_bench_quant_times_llama_cpp_in_the_same_rotation(monkeypatch):
    """The outside anchor's runs are interleaved with ours (a slow spell of the machine falls on both sides of the
    ratio), and its row carries the speed its runs measured."""
    from helpers import load_tool

    from offload_runtime.api.engine import CallStats

    bench = load_tool("bench_quant")
    order: list[str] = []
    real = bench.decode_method

    def ours(engine, new_tokens):
        method = real(engine, new_tokens)

        def run(repeat):
            order.append("ours")
            return method(repeat)
        return run

    def anchor(repeat):
        order.append("anchor")
        return bench.h.Run([[7] * 4], 0.01, CallStats(steps=4))

    monkeypatch.setattr(bench, "decode_method", ours)
    rows = bench.plain_speed("tiny", bench.QUICK, repeats=2, new_tokens=3, anchors={"llama.cpp Q4_0": anchor})
    by = {r["format"]: r for r in rows}
    assert list(by)[-1] == "llama.cpp Q4_0" and by["llama.cpp Q4_0"]["tokens_per_s"] == pytest.approx(400)
    assert len(by) == len(bench.FORMATS) + 1 and by["float32"]["vs_float32"] == 1
    runs = order[len(bench.FORMATS) + 1:]  # after one warm-up each: the repeats, rotated
    assert len(runs) == 2 * (len(bench.FORMATS) + 1) and runs.count("anchor") == 2
    first, second = (i for i, r in enumerate(runs) if r == "anchor")
    assert first < len(runs) // 2 <= second  # once in each repeat, not both at the end


def test_engine_follows_the_plans_measured_kernel_threshold():
    from types import SimpleNamespace

    from offload_runtime.api.loading import planned_kernel

    plan = SimpleNamespace(path="p.json", figures={"quant": "int4-g128", "quant_kernel": {"max_tokens": 64}})
    assert planned_kernel(plan, QuantSpec(4, 128)).max_tokens == 64
    assert planned_kernel(plan, QuantSpec(4, 32)) is None  # a plan for another format: measure at load instead
    assert planned_kernel(None, QuantSpec(4, 128)) is None and planned_kernel(plan, None) is None


@pytest.mark.parametrize("bits, group_size", [(4, 64), (8, -1)])
def test_int_kernel_rows_do_not_depend_on_the_rows_beside_them(bits, group_size):
    """Why 16-bit CPU runs use the kernel at every token count (exact_kernel_choice): its rows equal one-row calls."""
    N, K = 1536, 576  # SmolLM2-135M's gate/up shape, where oneDNN's bf16 matmul rounds by rows per call
    g = torch.Generator().manual_seed(3)
    spec = QuantSpec(bits, group_size, block=kernel_block(torch.device("cpu")))
    ints = quantize_rtn(torch.randn(N, K, generator=g) * 0.05, bits, group_size)
    w = {f"l.{k}": v for k, v in pack_linear(ints, spec).items()}
    x = torch.randn(80, K, generator=g).bfloat16()
    every = exact_kernel_choice(KernelChoice(16, "measured"), torch.bfloat16, torch.device("cpu"))
    assert every.max_tokens >= 1 << 30 and kernel_applies(w, "l", bits, x)
    one_row = torch.cat([quantized_linear(x[i:i + 1], w, "l", every) for i in range(len(x))])
    for m in (2, 17, 64, 80):
        assert torch.equal(quantized_linear(x[:m], w, "l", every), one_row[:m]), m
    measured = KernelChoice(16, "measured")
    assert exact_kernel_choice(measured, torch.float32, torch.device("cpu")) is measured
    assert exact_kernel_choice(None, torch.bfloat16, torch.device("cpu")) is None
    assert exact_kernel_choice(KernelChoice(0), torch.bfloat16, torch.device("cpu")).max_tokens == 0  # no kernel


def test_bf16_int4_speculative_and_batched_greedy_equal_plain_decoding():
    """The demo pair in int4 at bfloat16 (the CPU default where bf16 is native): a batch of 4 with grown trees
    mixes forwards of 1 to ~100 tokens; before exact_kernel_choice, prompt 0 drifted at token 28."""
    prompts = ["And the LORD spake unto Moses, saying", "In the beginning", "And it came to pass", "Blessed is the man"]
    kw = dict(device="cpu", plan=None, quiet=True, dtype="bfloat16", quantize="int4", group_size=32)

    def greedy(**options) -> list[list[int]]:
        engine = Engine.from_pretrained("demo", **kw, **options)
        return [r.token_ids for r in engine.generate(prompts, max_new_tokens=60, temperature=0, ignore_eos=True)]

    plain = greedy(draft=False)
    assert greedy(draft=False, batch_size=4) == plain
    assert greedy(batch_size=4, tree="dynamic") == plain


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_speculative_greedy_equals_plain_decoding_on_a_random_pair(tmp_path, dtype):
    """Random 16-bit models, int4 and unquantized, with self, self-int4 and a trained-like draft. Before attention
    ran in float64 on the CPU (model/transformer.py _attend), a query's 16-bit output depended on the queries and
    masked keys beside it: prompt 4 left plain decoding at token 19 with every draft."""
    shape = dict(initializer_range=0.02, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512)
    target = make_checkpoint(tmp_path / "target", "llama-mha", seed=11, num_hidden_layers=2, **shape)
    draft = tmp_path / "draft"
    make_truncated_draft(target, draft, "llama-mha", n_layers=1, noise=0.02, seed=5, **shape)
    prompts = [torch.randint(3, 512, (8,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(6)]
    kw = dict(device="cpu", plan=None, quiet=True, dtype=dtype)
    for quantize, drafts in (("int4", ("self", "self-int4", str(draft))), (None, (str(draft),))):
        plain = Engine.from_pretrained(target, draft=False, quantize=quantize, **kw)
        want = [r.token_ids for r in plain.generate(prompts, max_new_tokens=40, temperature=0, ignore_eos=True)]
        for name in drafts:
            engine = Engine.from_pretrained(target, draft=name, quantize=quantize, tree=[-1, 0, 1, 2, 3, 4, 5, 6],
                                            batch_size=3, **kw)
            got = [r.token_ids for r in engine.generate(prompts, max_new_tokens=40, temperature=0, ignore_eos=True)]
            assert got == want, (quantize, name)


def test_quantized_cache_reloads_the_same_model(checkpoints, monkeypatch):
    from offload_runtime.weights import quantized as q

    path = checkpoints["llama-gqa-llama3"]
    kw = dict(dtype="float64", draft=False, quantize="int4", group_size=32, cache_quantized=True)
    first = Engine.from_pretrained(path, **kw)
    calls = []
    monkeypatch.setattr(q, "quantize_rtn", lambda *a, **k: calls.append(a) or pytest.fail("quantized again"))
    again = Engine.from_pretrained(path, **kw)
    assert not calls and torch.equal(logits(first, IDS), logits(again, IDS))
    from offload_runtime.api.loading import quant_cache_dir
    files = list(quant_cache_dir(path).rglob("layer-*.safetensors"))
    assert len(files) == 3 and (files[0].parent / "complete.json").is_file()


def test_a_group_size_that_does_not_fit_names_the_model_and_the_sizes_that_do():
    with pytest.raises(UsageError, match=r"^draft demo-draft: group_size 128 does not divide the input width of "
                                         r"down_proj \(192\).*; use a group size that divides every linear's input "
                                         r"width \(64, 32, 16, -1\)$"):
        Engine.from_pretrained("demo", device="cpu", quantize="int4", draft_quantize="int4", quiet=True)


def test_a_damaged_quantized_cache_is_named_with_its_fix(checkpoints, tmp_path):
    from offload_runtime.api.loading import quant_cache_dir
    from offload_runtime.errors import StoreError
    from offload_runtime.weights.checkpoint import read_safetensors_header

    path = checkpoints["llama-gqa-llama3"]
    kw = dict(dtype="float32", draft=False, quantize="int4", group_size=32, cache_quantized=True)
    Engine.from_pretrained(path, **kw)
    layer = sorted(quant_cache_dir(path).rglob("layer-00001.safetensors"))[0]
    good = layer.read_bytes()
    # Truncated, gone, or holding other tensors: one line naming the cache and what to do, never "re-download".
    for damage in (lambda: layer.write_bytes(good[: len(good) // 2]), layer.unlink,
                   lambda: layer.write_bytes(good.replace(b".scales", b".scalex", 1))):
        damage()
        with pytest.raises(CheckpointError, match=r"the quantized cache .* is damaged .*; delete that directory and "
                                                  r"load again: it is rebuilt") as e:
            Engine.from_pretrained(path, **kw)
        assert "re-download" not in str(e.value)
        layer.write_bytes(good)
    assert len(read_safetensors_header(layer)) > 0
    # A cache that cannot be written (here its directory would be inside a file): one line, not a crash.
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match=r"cannot write the quantized cache to .*file/q .*; free space there"):
        quantized.PackedCache(blocker / "q", 1, 1).add(0, "l", {"qweight": torch.zeros(2)})


def test_cli_flags_reach_the_engine(tiny_pair):
    from offload_runtime.cli import ArgumentParser, add_model_args, add_sampling_args, load_engine

    p = ArgumentParser()
    add_model_args(p)
    add_sampling_args(p)
    target, draft = tiny_pair
    args = p.parse_args(["--model", str(target), "--draft", str(draft), "--quantize", "int4", "--draft-quantize",
                         "int8", "--group-size", "32", "--dtype", "float32", "--device", "cpu", "--plan", "none"])
    engine = load_engine(args)
    _, w = next(engine.target.layers.sweep())
    _, dw = next(engine.draft.layers.sweep())
    assert w["mlp.gate_up_proj.qweight"].dtype == torch.uint8 and dw["mlp.gate_up_proj.qweight"].dtype == torch.int8
    assert w["mlp.gate_up_proj.scales"].shape == (64 // 32, 2 * 96)


def test_a_config_that_disagrees_with_the_weights_on_quantization_says_so(quant_ckpts, tmp_path):
    awq = quant_ckpts["awq-g32"][0]
    declared = json.loads((awq / "config.json").read_text())["quantization_config"]
    plain = make_checkpoint(tmp_path / "plain", "llama-mha")
    config = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({**config, "quantization_config": declared}))
    with pytest.raises(CheckpointError, match=r"config.json declares AWQ quantization, but the checkpoint holds "
                                              r"unquantized linears \(model.layers.0.* remove quantization_config"):
        Checkpoint(plain).validate()
    stripped = tmp_path / "stripped"
    shutil.copytree(awq, stripped)
    config = json.loads((stripped / "config.json").read_text())
    del config["quantization_config"]
    (stripped / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"holds quantized linears \(model.layers.0.*qweight, ...\) but its "
                                              r"config.json has no quantization_config"):
        Checkpoint(stripped).validate()
