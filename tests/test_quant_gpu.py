"""Quantized layers on CUDA (run by tools/device_check.py on a lent GPU; deselected elsewhere, skipped without
CUDA): the tinygemm int4 kernel against dequantize + matmul, and streamed == resident for packed layers."""
import pytest
import torch

from helpers import make_checkpoint
from offload_runtime import Engine
from offload_runtime.model.quantization import KernelChoice, kernel_applies, quantized_linear
from test_quant import IDS, rel_err

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def wide_gpu(tmp_path_factory):
    # Input widths that are multiples of 1024 (tinygemm's K tiles), so the CUDA int4 kernel applies.
    return make_checkpoint(tmp_path_factory.mktemp("wgpu") / "m", "llama-mha", hidden_size=1024,
                           intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=4, vocab_size=256, seed=9)


@cuda
@pytest.mark.parametrize("tokens", [1, 64, 512])
def test_cuda_int4_kernel_agrees_with_dequantize(wide_gpu, tokens):
    engine = Engine.from_pretrained(wide_gpu, device="cuda", dtype="bfloat16", draft=False, quantize="int4")
    _, w = next(engine.target.layers.sweep())
    x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)
    assert kernel_applies(w, "mlp.gate_up_proj", 4, x)
    a = quantized_linear(x, w, "mlp.gate_up_proj", KernelChoice(1 << 20)).float()
    b = quantized_linear(x, w, "mlp.gate_up_proj", KernelChoice(0)).float()
    assert rel_err(a, b) < 2e-2  # bf16 rounding of scales and products, not a different weight


@cuda
@pytest.mark.parametrize("slots", [2, 3])
@pytest.mark.parametrize("resident", [0, 2, 4])
def test_cuda_quantized_streamed_equals_resident_bitwise(wide_gpu, slots, resident):
    kw = dict(device="cuda", dtype="bfloat16", draft=False, quantize="int4")
    base = Engine.from_pretrained(wide_gpu, offload=False, **kw)
    streamed = Engine.from_pretrained(wide_gpu, offload=True, slots=slots, resident_layers=resident, **kw)
    assert base.target.kernel == streamed.target.kernel
    cache_logits = [logits_cuda(e) for e in (base, streamed)]
    assert torch.equal(*cache_logits)


@cuda
def test_cuda_greedy_speculative_equals_plain_int4_float32(wide_gpu):
    kw = dict(device="cuda", dtype="float32", quantize="int4", plan=None)
    plain = Engine.from_pretrained(wide_gpu, draft=False, **kw)
    spec = Engine.from_pretrained(wide_gpu, draft=str(wide_gpu), draft_quantize="int4", tree=[-1, 0, 0, 1, 2],
                                  **kw)
    a = plain.generate(IDS, max_new_tokens=24, temperature=0, ignore_eos=True)[0].token_ids
    assert spec.generate(IDS, max_new_tokens=24, temperature=0, ignore_eos=True)[0].token_ids == a


def logits_cuda(engine):
    from offload_runtime.model.batch import RowChunk, build_forward
    from offload_runtime.model.kv_cache import KVCache
    from offload_runtime.model.tree import Tree

    cache = KVCache(engine.target.args, 1, 64, engine.target.dtype, "cuda")
    batch = build_forward([RowChunk(0, Tree.chain(len(IDS)), IDS, range(len(IDS)), range(len(IDS)))],
                          cache.scratch_slot, None, "cuda")
    return engine.target.forward(batch, cache)[0].cpu()
