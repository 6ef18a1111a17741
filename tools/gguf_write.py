"""Write a GGUF file from a transformers model, as llama.cpp's converter lays it out: for tests and benchmarks.

`write_gguf(model, path, types)` names and orders the tensors as llama.cpp does (q/k rows permuted for its
RoPE on llama files), writes the config and a byte-level BPE tokenizer (with a chat template) as metadata, and
stores each decoder linear in the GGML type `types(layer, linear)` says. The legacy types go through the gguf
package's own quantizers; it has none for the K-quants, so those are random blocks with small fp16 scales
(their bytes are what matters: the runtime and transformers must read the same weights from them).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from offload_runtime.model.quantization import LINEARS
from offload_runtime.weights.gguf import gguf_name

SPECIALS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


# llama.cpp's quantizer keeps a K-quant only where a row is whole 256-weight super-blocks; elsewhere it falls back
# (SmolLM2-135M's width 576 is 2.25 of them).
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def q4_k_m_types(n_layers: int) -> Callable[[int, str], str]:
    """llama.cpp's Q4_K_M mix: Q4_K everywhere, Q6_K for attn_v and ffn_down in the layers its
    `use_more_bits` picks (the first and last eighth, and every third in between)."""
    def more_bits(i: int) -> bool:
        return i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2

    return lambda i, linear: "Q6_K" if linear in ("self_attn.v_proj", "mlp.down_proj") and more_bits(i) else "Q4_K"


def permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's reordering of a q/k projection's rows (rows (h, j, d) of HF become rows (h, d, j))."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# Where each block type keeps its fp16 scales (d, and m / dmin where it has one), and their size: weights
# come out of random blocks about as large as a trained model's.
_SCALES = {"Q4_0": (0, 1, 0.01), "Q5_0": (0, 1, 0.005), "Q8_0": (0, 1, 5e-4), "Q4_1": (0, 2, 0.005),
           "Q5_1": (0, 2, 0.003), "Q4_K": (0, 2, 2e-4), "Q5_K": (0, 2, 1e-4), "Q6_K": (208, 1, 3e-4)}


def llama3_rope_factors(cfg: Any, head_dim: int) -> torch.Tensor:
    """llama.cpp's converter's rope_freqs for llama3 scaling: per frequency, original / scaled (float32)."""
    scaling = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None)
    base = float(scaling.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for freq in (1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))).tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def random_blocks(type_name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random blocks uint8 [rows, cols / E * bytes] of a GGML block type, with small finite fp16 scales."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
    if type_name not in _SCALES:  # a type the runtime does not read: any bytes do
        return b.reshape(rows, -1)
    at, count, size = _SCALES[type_name]
    scales = (rng.uniform(0.5, 1.5, (rows, cols // block, count)) * size).astype(np.float16)
    b[..., at: at + 2 * count] = scales.view(np.uint8).reshape(rows, cols // block, 2 * count)
    return b.reshape(rows, -1)


def encode(w: torch.Tensor, type_name: str, seed: int, random: bool = False) -> tuple[np.ndarray, Any]:
    """(data, raw dtype) of one tensor stored in GGML type `type_name`: `w` quantized by the gguf package, or
    random blocks (the K-quants, which it cannot quantize, or every block type when `random`)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name not in ("F32", "F16", "BF16") and (random or type_name.endswith("_K")):
        return random_blocks(type_name, w.shape[0], w.shape[1], seed), qtype
    x = w.detach().to(torch.float32).numpy()
    if type_name == "F32":
        return x, None
    if type_name == "F16":
        return x.astype(np.float16), None
    return gguf.quants.quantize(x, qtype), qtype


def _tokenizer_metadata(writer: Any, vocab_size: int) -> None:
    """A byte-level BPE vocabulary of `vocab_size` tokens: the specials, the 256 bytes, then merged pairs."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    tokens, merges = SPECIALS + byte_chars, []
    letters = "etaoinshrdlu\u0120"
    for a in letters:
        for b in letters:
            if len(tokens) >= vocab_size:
                break
            if a + b not in tokens:
                merges.append(f"{a} {b}")
                tokens.append(a + b)
    tokens += [f"<unused{i}>" for i in range(vocab_size - len(tokens))]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)


def random_gguf(args: Any, path: Path, types: Callable[[int, str], str] | str, *, fill: bool = False,
                **options: Any) -> Path:
    """A GGUF file of the runtime's ModelArgs `args` (norms of ones, F16 embeddings of random normal weights) with
    random blocks in `types`: speed only. With `fill` every tensor holds RandomWeights' values in F32 (a file for
    llama.cpp's own quantizer)."""
    import transformers

    from offload_runtime.weights.random import RandomWeights

    cfg = transformers.LlamaConfig(**args.to_hf_config())
    src = RandomWeights(args, seed=0)
    sd = {n: src.read_into(n, torch.empty(s)) for n, s in args.global_shapes().items()}
    for i in range(args.n_layers):
        for n, s in args.layer_shapes().items():
            name = f"model.layers.{i}.{n}"  # norms are ones; random blocks need only a linear's shape
            sd[name] = src.read_into(name, torch.empty(s)) if fill or len(s) == 1 else torch.empty(s)
    return write_gguf(cfg, sd, path, types, random=not fill, embed_type="F32" if fill else "F16", **options)


def write_gguf(cfg: Any, sd: dict[str, torch.Tensor], path: Path, types: Callable[[int, str], str] | str = "F32",
               *, name: str = "tiny", embed_type: str = "F32", tokenizer: bool = True, seed: int = 0,
               skip: tuple[str, ...] = (), random: bool = False, arch: str | None = None,
               extra: dict[str, Any] | None = None, **writer_options: Any) -> Path:
    """Write the transformers config `cfg` (llama, mistral or qwen2) with weights `sd` (its state dict) to `path`;
    returns path. `types`: one type name for every decoder linear, or (layer, linear) -> name; `random`: random
    blocks instead of quantizing `sd`; `skip`: GGUF tensor names left out; `arch`: another architecture name;
    `extra`: GGUF tensor name -> (tensor, type) added (both to make broken files). `writer_options` go to
    GGUFWriter (split_max_tensors=... writes a split file)."""
    import gguf

    arch = arch or {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}[cfg.model_type]
    pick = (lambda i, linear: types) if isinstance(types, str) else types
    writer = gguf.GGUFWriter(str(path), arch, **writer_options)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    writer.add_vocab_size(cfg.vocab_size)
    if tokenizer:
        _tokenizer_metadata(writer, cfg.vocab_size)

    def add(name: str, w: torch.Tensor, type_name: str, k: int) -> None:
        """Tensor `name` (the GGUF name) in GGML type `type_name`; `k` keys its random blocks' seed."""
        if name in skip:
            return
        data, raw = encode(w, type_name, seed + k, random)
        writer.add_tensor(name, data, raw_dtype=raw)

    add(gguf_name("model.embed_tokens.weight"), sd["model.embed_tokens.weight"], embed_type, 1)
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            add(gguf_name(f"{pre}{norm}.weight"), sd[f"{pre}{norm}.weight"], "F32", 0)
        for k, hf in enumerate(LINEARS):
            # llama files hold q/k rows (and biases) in llama.cpp's RoPE order, by their head counts
            permuted = {"self_attn.q_proj": heads, "self_attn.k_proj": kv_heads}.get(hf) if arch == "llama" else None
            w = sd[pre + hf + ".weight"]
            w = w if permuted is None else permute_rows(w, permuted)
            kind = pick(i, hf)
            if kind in K_FALLBACK and w.shape[1] % 256:
                kind = K_FALLBACK[kind]
            add(gguf_name(pre + hf + ".weight"), w, kind, 100 * i + k + 2)
            if pre + hf + ".bias" in sd:
                b = sd[pre + hf + ".bias"]
                b = b if permuted is None else permute_rows(b, permuted)
                add(gguf_name(pre + hf + ".bias"), b, "F32", 0)
    scaling = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
    if scaling.get("rope_type") == "llama3":
        add("rope_freqs.weight", llama3_rope_factors(cfg, head_dim), "F32", 0)
    add(gguf_name("model.norm.weight"), sd["model.norm.weight"], "F32", 0)
    if not cfg.tie_word_embeddings:
        add(gguf_name("lm_head.weight"), sd["lm_head.weight"], embed_type, 99)
    for name, (w, type_name) in (extra or {}).items():
        add(name, w, type_name, 7)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
