"""GGUF files (llama.cpp's format, what Ollama and LM Studio hand out) as a weight source.

A GGUF file holds its config and tokenizer as metadata and every tensor in GGML blocks (model/ggml.py). The
model's shape comes from the metadata (`{arch}.block_count`, `.embedding_length`, ...), as transformers' GGUF
loader reads it. The decoder linears stay in the file's blocks: `GGUFSource.read_into` copies a linear's bytes
as they are into its place in a layer's buffer (bytes per sweep = the file's bytes for those layers), and the
layer's forward dequantizes them with torch ops. Norms and the globals (embeddings, lm_head) are dequantized into
the compute dtype as they are read, one tensor at a time.

llama.cpp's converter reorders the rows of each head of `attn_q` / `attn_k` for its RoPE, which pairs
neighbouring dimensions (the HF layout pairs dimension d with d + head_dim / 2). Rows are whole numbers of
blocks, so the reader undoes it on the packed bytes, exactly as transformers' loader undoes it on the
dequantized weights: rows (h, d, j) of the file are rows (h, j, d) of the model (j < 2, d < head_dim / 2).
The qwen2 converter does not permute. Llama 3.1+'s RoPE scaling travels as per-frequency factors
(`rope_freqs.weight`), matched back to its llama3 parameters (GGUFSource._llama3_scaling).

Reading parses the file's header (with the `gguf` package's GGUFReader, which maps the file but touches only
the header's pages) and reads tensor bytes with `readinto` straight into the buffers that keep them, as the
safetensors reader does, so the model is never held twice.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError, MissingFileError
from ..model.config import ModelArgs
from ..model import ggml
from ..model.ggml import DEQUANT_CHUNK, SUPPORTED_TYPES, BlockType, dequantize, supported_names
from ..model.quantization import LINEARS
from .checkpoint import TensorInfo, read_tensor_into

ARCHITECTURES = ("llama", "qwen2")  # GGUF architecture names (Mistral's files say llama)
PERMUTED_ARCHITECTURES = ("llama",)  # whose converter reorders attn_q / attn_k rows
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's RoPE factors of Llama 3.1+ (see GGUFSource._llama3_scaling)
LLAMA3_SCALINGS = tuple({"rope_type": "llama3", "factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192} for f in (8.0, 32.0, 16.0))  # 3.1/3.3; 3.2
SPLIT = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<total>\d{5})\.gguf$")

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` names a GGUF model: a .gguf file, or a directory holding .gguf files and no config.json."""
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        return True
    return p.is_dir() and not (p / "config.json").is_file() and any(p.glob("*.gguf"))


def gguf_files(path: str | os.PathLike) -> list[Path]:
    """The files of the GGUF model at `path` (a file, the first part of a split file, or a directory holding one
    model), every part of a split file in order; a missing part is named."""
    p = Path(path).expanduser()
    if p.is_dir():
        every = sorted(p.glob("*.gguf"))
        later = [f.name for f in every if SPLIT.match(f.name) and SPLIT.match(f.name)["part"] != "00001"]
        found = [f for f in every if f.name not in later]
        if not found and later:  # only later parts of a split file: its first part is what is missing
            m = SPLIT.match(later[0])
            raise MissingFileError(f"{p} holds {', '.join(later)} but not their first part "
                                   f"{m['stem']}-00001-of-{m['total']}.gguf; download every part")
        if len(found) != 1:
            names = ", ".join(f.name for f in found) or "none"
            raise CheckpointError(f"{p} should hold one GGUF model, but holds {names}; pass the .gguf file itself")
        p = found[0]
    if not p.is_file():
        raise MissingFileError(f"GGUF file {p} not found; check the path")
    m = SPLIT.match(p.name)
    if m is None:
        return [p]
    if m["part"] != "00001":
        raise CheckpointError(f"{p.name} is part {int(m['part'])} of a split GGUF file; pass its first part "
                              f"({m['stem']}-00001-of-{m['total']}.gguf)")
    parts = [p.with_name(f"{m['stem']}-{k:05d}-of-{m['total']}.gguf") for k in range(1, int(m["total"]) + 1)]
    missing = [q.name for q in parts if not q.is_file()]
    if missing:
        raise MissingFileError(f"split GGUF file {p.name} lacks part(s) {', '.join(missing)} in {p.parent}; "
                               f"download every part")
    return parts


def model_args(path: str | os.PathLike) -> ModelArgs:
    """The shape of the model at `path`: a GGUF file's metadata, or a checkpoint directory's config.json."""
    return GGUFSource(path).args if is_gguf(path) else ModelArgs.from_file(path)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: where its bytes are, its GGML type and its shape in the HF order [N, K]."""

    name: str  # the file's name: blk.3.attn_q.weight
    file: Path
    kind: BlockType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    def raw_info(self) -> TensorInfo:
        """The tensor's bytes as uint8 rows [N, row bytes] (a 1-D tensor: a row per element)."""
        rows = self.shape[0]
        return TensorInfo(self.name, self.file, torch.uint8, (rows, self.nbytes // rows), self.offset, self.nbytes)


def _read_header(file: Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """(metadata key -> value, tensors) of one GGUF file; the tensors' byte ranges are checked against its size."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(file)
    except (ValueError, KeyError, IndexError, OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is truncated or not a GGUF file ({type(e).__name__}); re-download it") \
            from None
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    size = file.stat().st_size
    tensors = []
    for t in reader.tensors:
        kind = SUPPORTED_TYPES.get(int(t.tensor_type))
        if kind is None:
            raise CheckpointError(
                f"tensor {t.name} in {file.name} is of GGML type {t.tensor_type.name}, which the runtime does not "
                f"read (it reads {supported_names()}); use a file quantized to one of those")
        if t.data_offset + int(t.n_bytes) > size:
            raise CheckpointError(f"tensor {t.name} lies past the end of {file}: the file is truncated; re-download it")
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        tensors.append(GGUFTensor(t.name, file, kind, shape, int(t.data_offset), int(t.n_bytes)))
    return meta, tensors


def _hf_name(name: str) -> str | None:
    stem, _, suffix = name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    m = re.match(r"^blk\.(\d+)\.(\w+)$", stem)
    if m and m[2] in _LAYER_NAMES:
        return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.{suffix}"
    return None


def gguf_name(hf_name: str) -> str:
    """The GGUF name of a tensor named `hf_name` in transformers (the inverse of _hf_name)."""
    stem, _, suffix = hf_name.rpartition(".")
    for gg, hf in _GLOBAL_NAMES.items():
        if stem == hf:
            return f"{gg}.{suffix}"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{next(gg for gg, hf in _LAYER_NAMES.items() if hf == rest)}.{suffix}"


def args_from_metadata(meta: dict[str, Any], tensors: dict[str, GGUFTensor], where: str) -> ModelArgs:
    """ModelArgs from a GGUF file's metadata (the keys transformers' GGUF loader maps to a config)."""
    arch = meta["general.architecture"]
    assert arch in ARCHITECTURES, arch  # GGUFSource checked it

    def key(name: str, default: Any = KeyError) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is KeyError:
            raise CheckpointError(f"{where} lacks metadata {arch}.{name}; the file is incomplete, re-download it")
        return value

    dim, heads = int(key("embedding_length")), int(key("attention.head_count"))
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None:
        raise CheckpointError(f"{where} lacks tensor token_embd.weight; the file is incomplete, re-download it")
    model_name = str(meta.get("general.name", "")).lower()
    cfg: dict[str, Any] = {
        # transformers calls a llama file whose general.name says mistral a Mistral model
        "model_type": "mistral" if arch == "llama" and "mistral" in model_name else arch,
        "vocab_size": int(meta.get(f"{arch}.vocab_size", embed.shape[0])),
        "hidden_size": dim, "num_hidden_layers": int(key("block_count")),
        "intermediate_size": int(key("feed_forward_length")), "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", dim // heads)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length")),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    scaling = key("rope.scaling.type", None)
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ConfigError(f"{where} uses RoPE scaling {scaling!r}; the runtime reads linear scaling from GGUF")
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    if cfg["model_type"] == "mistral":
        cfg["sliding_window"] = None
    return ModelArgs.from_hf_config(cfg, where)


class GGUFSource:
    """A WeightSource over a GGUF file (or a split file's parts): tensors by their transformers names, decoder
    linears as the file's bytes under the names model/ggml.py gives them (`self_attn.q_proj.q4_k`)."""

    def __init__(self, path: str | os.PathLike):
        self.files = gguf_files(path)
        self.path = self.files[0]
        self.label = self.path.name
        headers = [_read_header(file) for file in self.files]
        meta = headers[0][0]  # the first part holds the model's metadata
        self.arch = meta.get("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"{self.label} holds a {self.arch!r} model; the runtime runs GGUF architectures "
                              f"{', '.join(ARCHITECTURES)} (llama covers Mistral)")
        self.tensors: dict[str, GGUFTensor] = {}
        self.rope_freqs: GGUFTensor | None = None
        for _, part_tensors in headers:
            for t in part_tensors:
                if t.name == ROPE_FREQS:
                    self.rope_freqs = t
                    continue
                name = _hf_name(t.name)
                if name is None:
                    raise CheckpointError(f"{self.label} holds tensor {t.name}, which a {self.arch} model does not "
                                          f"have; the file is not one the runtime can run")
                self.tensors[name] = t
        self.metadata = meta
        args = args_from_metadata(meta, self.tensors, self.label)
        if self.rope_freqs is not None:
            args = replace(args, rope_scaling=self._llama3_scaling(args))
        self.args = replace(args, ggml_types=self._check_tensors(args))

    def _llama3_scaling(self, args: ModelArgs) -> dict[str, Any]:
        """The llama3 RoPE scaling whose per-frequency factors the file's rope_freqs holds.

        llama.cpp's converter writes Llama 3.1+'s scaling as factors (the original frequency over the scaled one)
        and drops its parameters; the published models use the parameter sets of LLAMA3_SCALINGS, so the one
        whose factors match the file's (to float32 rounding) is the model's. transformers' GGUF loader ignores
        rope_freqs; the model it was converted from (and llama.cpp) apply it."""
        from ..model.transformer import rope_inv_freq

        t = self.rope_freqs
        if t.kind.name != "F32" or t.shape != (args.head_dim // 2,):
            raise CheckpointError(f"{self.label}: rope_freqs.weight is {t.kind.name} {list(t.shape)}, not F32 "
                                  f"[{args.head_dim // 2}]; the file is corrupt")
        factors = torch.empty(t.shape, dtype=torch.float32)
        self.read_gguf_tensor(t, factors)
        plain = rope_inv_freq(replace(args, rope_scaling=None))
        for scaling in LLAMA3_SCALINGS:
            scaled = rope_inv_freq(replace(args, rope_scaling=scaling))
            if torch.allclose(plain / scaled, factors, rtol=1e-5, atol=0):
                return dict(scaling)
        raise ConfigError(f"{self.label} scales RoPE by factors (rope_freqs.weight) that match no llama3 scaling "
                          f"the runtime knows (factor {', '.join(str(s['factor']) for s in LLAMA3_SCALINGS)}, "
                          f"low 1, high 4, original context 8192); use the model's safetensors checkpoint")

    def _check_tensors(self, args: ModelArgs) -> tuple[tuple[str, ...], ...]:
        """Every tensor the model needs, in its shape; returns each layer's linears' GGML types."""
        expected = args.expected_tensors()
        missing = sorted(gguf_name(n) for n in set(expected) - set(self.tensors))
        if missing:
            raise CheckpointError(f"{self.label} lacks tensor(s) {', '.join(missing[:4])}"
                                  f"{' and more' if len(missing) > 4 else ''}; the file is incomplete or of "
                                  f"another model, re-download it")
        for name, shape in expected.items():
            t = self.tensors[name]
            if t.shape != tuple(shape):
                raise CheckpointError(f"tensor {t.name} in {self.label} has shape {list(t.shape)} but the metadata "
                                      f"says {list(shape)}; the file is corrupt, re-download it")
            if len(shape) == 2 and shape[1] % t.kind.block:
                raise CheckpointError(f"tensor {t.name} in {self.label}: rows of {shape[1]} are not whole "
                                      f"{t.kind.name} blocks of {t.kind.block}; the file is corrupt")
        return tuple(tuple(self.tensors[f"model.layers.{i}.{linear}.weight"].kind.name for linear in LINEARS)
                     for i in range(args.n_layers))

    @property
    def has_tokenizer(self) -> bool:
        """Whether the metadata holds a vocabulary (transformers builds the tokenizer from it)."""
        return "tokenizer.ggml.tokens" in self.metadata

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def _heads(self, hf_name: str) -> int | None:
        """The head count whose rows llama.cpp reordered in tensor `hf_name` (None: it did not reorder them)."""
        if self.arch not in PERMUTED_ARCHITECTURES or not hf_name.startswith("model.layers."):
            return None
        linear = hf_name.split(".", 3)[-1].rpartition(".")[0]
        return {"self_attn.q_proj": self.args.n_heads, "self_attn.k_proj": self.args.n_kv_heads}.get(linear)

    def _unpermute(self, hf_name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows of attn_q / attn_k in the HF order (see the module docstring); other tensors as they are."""
        heads = self._heads(hf_name)
        if heads is None:
            return rows
        n, r = rows.shape[0], rows.numel() // rows.shape[0]
        return rows.reshape(heads, n // heads // 2, 2, r).transpose(1, 2).reshape(rows.shape)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Tensor `name` into `out`: a linear's bytes (`{linear}.{type key}`, uint8 [N, row bytes]) as the file
        has them, rows un-permuted; any other tensor dequantized into out's dtype."""
        stem, _, suffix = name.rpartition(".")
        if suffix in ggml.BY_KEY:
            t = self.tensors[f"{stem}.weight"]
            assert t.kind.key == suffix and out.dtype == torch.uint8, (name, t.kind, out.dtype)
            if self._heads(name) is None:
                return read_tensor_into(t.raw_info(), out)
            return out.copy_(self._unpermute(name, read_tensor_into(t.raw_info(), torch.empty_like(out))))
        return self.read_gguf_tensor(self.tensors[name], out, name)

    def read_gguf_tensor(self, t: GGUFTensor, out: torch.Tensor, name: str = "") -> torch.Tensor:
        """Tensor `t` dequantized into `out` (rows un-permuted when `name` is a q/k projection's)."""
        assert tuple(out.shape) == t.shape, (t.name, out.shape, t.shape)
        info = t.raw_info()
        rows = info.shape[0]
        # Big tensors (the embeddings) go DEQUANT_CHUNK weights at a time: a chunk of raw bytes in memory at once.
        step = max(1, DEQUANT_CHUNK // max(1, out.numel() // rows))
        flat = out.view(rows, -1)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            row_bytes = info.shape[1]
            part = TensorInfo(t.name, t.file, torch.uint8, (r1 - r0, row_bytes), t.offset + r0 * row_bytes,
                              (r1 - r0) * row_bytes)
            raw = read_tensor_into(part, torch.empty(part.shape, dtype=torch.uint8))
            if r1 - r0 < rows:
                assert self._heads(name) is None, name  # a q/k bias is one chunk: its rows permute as a whole
            dequantize(self._unpermute(name, raw), t.kind, out.dtype, flat[r0:r1])
        return out
