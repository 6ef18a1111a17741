"""Peak host memory of quantized loads, measured in a fresh process (private memory), as tests/test_streaming.py does."""
import textwrap

import torch

from helpers import make_checkpoint, peak_private_growth
from quant_helpers import QuantCase, make_quantized_checkpoint
from offload_runtime.model.config import ModelArgs
from offload_runtime.model.quantization import QuantSpec
from offload_runtime.weights.layout import layer_bytes

BIG = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
           num_key_value_heads=6, vocab_size=4096)


def peak_growth(path, **options) -> int:
    setup = textwrap.dedent(f"""
        from offload_runtime import Engine
        from offload_runtime.weights.checkpoint import Checkpoint
        from offload_runtime.weights.loader import default_kernel
        from offload_runtime.weights.quantized import quant_spec_for
        import torch
        args = Checkpoint({str(path)!r}).args  # warm imports outside the measurement
        # The int kernel's timing (once per process and shape, at most 1024 rows of one linear) is not the load's.
        default_kernel(args, quant_spec_for(args, {options.get("quantize")!r}, None, "m"), torch.float16,
                       torch.device("cpu"))
    """)
    measured = textwrap.dedent(f"""
        engine = Engine.from_pretrained({str(path)!r}, dtype="float16", draft=False, offload=True, resident_layers=0,
                                        max_seq_len=16, progress=False, **{options!r})
    """)
    return peak_private_growth(setup, measured)["grown"]

def test_loading_a_quantized_checkpoint_stays_near_its_file_size(tmp_path):
    path, _ = make_quantized_checkpoint(tmp_path / "awq", "llama-mha", QuantCase("awq", group_size=128), **BIG)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert size > 5e6
    grown = peak_growth(path)
    # The store (about the file's packed bytes), two slots, float16 globals; one linear unpacked at a time.
    assert grown < 1.25 * size + 16e6, (grown, size)


def test_quantizing_on_load_stays_near_the_quantized_size(tmp_path):
    # Small vocabulary: the bound is about layers, and float16 globals would dominate the quantized size.
    path = make_checkpoint(tmp_path / "fp16", "llama-mha", dtype=torch.float16, hidden_size=512,
                           intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                           vocab_size=512)
    args = ModelArgs.from_file(path)
    spec = QuantSpec(4, 128)
    quantized = args.n_layers * layer_bytes(args, torch.float16, spec) + args.global_numel() * 2
    one_fp16_layer = layer_bytes(args, torch.float16)
    file_size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    # Holding the whole fp16 model would break the bound below.
    assert file_size > 1.25 * quantized + one_fp16_layer + 16e6
    grown = peak_growth(path, quantize="int4")
    assert grown < 1.25 * quantized + one_fp16_layer + 16e6, (grown, quantized, one_fp16_layer)
