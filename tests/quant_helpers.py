"""Tiny quantized checkpoints written the way AutoAWQ, AutoGPTQ and GPTQModel write them.

The packers below follow the tools' own packing loops (AutoAWQ's WQLinear_GEMM.from_linear, AutoGPTQ's
QuantLinear.pack: column by column, shifting each integer into its int32 word, AutoGPTQ's zero points minus
one as uint32), written independently of the runtime's readers. Each checkpoint also returns the float64
weights W = (q - z) * s the tool means, so tests compare the runtime against transformers running those.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from helpers import hf_config, make_checkpoint

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: word nibble i <- column order[i] of each eight
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _as_int32(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(words.astype(np.uint32).view(np.int32).copy())


def pack_awq(intweight: np.ndarray) -> torch.Tensor:
    """[R, C] integers 0..15 -> int32 [R, C / 8], AWQ's interleaved nibble order (as from_linear packs)."""
    R, C = intweight.shape
    words = np.zeros((R, C // 8), dtype=np.uint32)
    for col in range(C // 8):
        for i in range(8):
            words[:, col] |= intweight[:, col * 8 + AWQ_PACK_ORDER[i]].astype(np.uint32) << np.uint32(4 * i)
    return _as_int32(words)


def pack_gptq_rows(intweight: np.ndarray, bits: int) -> torch.Tensor:
    """[K, N] -> int32 [K * bits / 32, N]: input rows packed in order, low bits first (QuantLinear.pack)."""
    per = 32 // bits
    K, N = intweight.shape
    words = np.zeros((K // per, N), dtype=np.uint32)
    for row in range(K // per):
        for j in range(per):
            words[row] |= intweight[row * per + j].astype(np.uint32) << np.uint32(bits * j)
    return _as_int32(words)


def pack_gptq_zeros(zeros: np.ndarray, bits: int, v1: bool) -> torch.Tensor:
    """[G, N] zero points -> int32 [G, N * bits / 32]; v1 (AutoGPTQ) stores each minus one."""
    per = 32 // bits
    stored = (zeros - 1 if v1 else zeros).astype(np.int64).astype(np.uint32)
    G, N = zeros.shape
    words = np.zeros((G, N // per), dtype=np.uint32)
    for col in range(N // per):
        for j in range(per):
            words[:, col] |= stored[:, col * per + j] << np.uint32(bits * j)
    return _as_int32(words)


@dataclass
class QuantCase:
    method: str  # "awq" | "gptq"
    bits: int = 4
    group_size: int = 32
    sym: bool = False
    desc_act: bool = False
    v1: bool = True  # GPTQ: AutoGPTQ's zeros-minus-one; False: GPTQModel's gptq_v2

    @property
    def name(self) -> str:
        if self.method == "awq":
            return f"awq-g{self.group_size}"
        return (f"gptq-{self.bits}b-g{self.group_size}-{'sym' if self.sym else 'asym'}"
                f"{'-act' if self.desc_act else ''}-{'v1' if self.v1 else 'v2'}")

    def quantization_config(self) -> dict:
        if self.method == "awq":
            return {"quant_method": "awq", "bits": 4, "group_size": self.group_size, "zero_point": True,
                    "version": "gemm", "modules_to_not_convert": None}
        return {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size, "sym": self.sym,
                "desc_act": self.desc_act, "damp_percent": 0.01, "true_sequential": True,
                "checkpoint_format": "gptq" if self.v1 else "gptq_v2"}


def random_linear_ints(N: int, K: int, case: QuantCase, g: torch.Generator):
    """q [N, K], z [G, N], s fp16 [G, N], g_idx [K] as a quantizer would leave them."""
    maxq = 2 ** case.bits - 1
    group = K if case.group_size == -1 else case.group_size
    G = K // group
    q = torch.randint(0, maxq + 1, (N, K), generator=g)
    if case.sym:
        z = torch.full((G, N), (maxq + 1) // 2)
    else:  # AutoGPTQ's v1 cannot store a zero point of 0 (it would be -1); keep them >= 1 for both
        z = torch.randint(1, maxq + 1, (G, N), generator=g)
    s = (torch.rand(G, N, generator=g) * 0.4 / maxq + 0.05 / maxq).half()
    if case.desc_act:
        perm = torch.randperm(K, generator=g)
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[perm] = (torch.arange(K) // group).to(torch.int32)
    else:
        g_idx = (torch.arange(K) // group).to(torch.int32)
    return q, z, s, g_idx


def dequantized(q, z, s, g_idx) -> torch.Tensor:
    """The weight the tool means, in float64: W[n, k] = (q - z[g(k), n]) * s[g(k), n]."""
    idx = g_idx.long()
    return (q.double() - z.double().t()[:, idx]) * s.double().t()[:, idx]


def make_quantized_checkpoint(path: Path, config: str, case: QuantCase, seed: int = 0,
                              **overrides) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint of `config` whose decoder linears are quantized as `case` says, in the tool's layout and
    float16 elsewhere; returns (path, the float64 state dict transformers should run)."""
    from safetensors.torch import load_file, save_file

    make_checkpoint(path, config, seed=seed, dtype=torch.float16, **overrides)
    state = load_file(path / "model.safetensors")
    reference = {k: v.double() for k, v in state.items()}
    g = torch.Generator().manual_seed(seed + 1000)
    out = {}
    for name, tensor in state.items():
        linear = name.removesuffix(".weight")
        if not (name.startswith("model.layers.") and linear.split(".", 3)[-1] in LINEARS and name.endswith(".weight")):
            out[name] = tensor
            continue
        N, K = tensor.shape
        q, z, s, g_idx = random_linear_ints(N, K, case, g)
        reference[name] = dequantized(q, z, s, g_idx)
        if case.method == "awq":
            out[linear + ".qweight"] = pack_awq(q.t().numpy())
            out[linear + ".qzeros"] = pack_awq(z.numpy())
        else:
            out[linear + ".qweight"] = pack_gptq_rows(q.t().numpy(), case.bits)
            out[linear + ".qzeros"] = pack_gptq_zeros(z.numpy(), case.bits, case.v1)
            out[linear + ".g_idx"] = g_idx
        out[linear + ".scales"] = s
    (path / "model.safetensors").unlink()
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = case.quantization_config()
    (path / "config.json").write_text(json.dumps(cfg))
    return path, reference


def reference_from_state(config: str, state: dict[str, torch.Tensor], **overrides):
    """A transformers model (float64) of `config` holding `state` (e.g. the weights a quantized checkpoint means)."""
    import transformers

    from helpers import ARCHS

    cfg = hf_config(config, **overrides)
    model = getattr(transformers, ARCHS[cfg.model_type])(cfg).to(torch.float64)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
