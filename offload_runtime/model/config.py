"""ModelArgs: the shape of a Llama-family model, built from a Hugging Face config.json.

Published checkpoints spell the same things in several ways (transformers 4 writes `rope_theta` and
`rope_scaling`, transformers 5 writes `rope_parameters`; scaling dicts say `type` or `rope_type`), so
`from_hf_config` normalises them and drops every key the runtime does not use.

Sliding-window attention follows transformers' own configs: Mistral's `sliding_window` applies to every layer;
Qwen2/Qwen3 slide only with `use_sliding_window`, and then only the layers `layer_types` marks
"sliding_attention" (transformers derives that list from `max_window_layers` when config.json has none: layers
from that index on slide).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, MissingFileError
from .quantization import CheckpointQuant, input_widths, parse_quantization_config

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
QWEN_TYPES = ("qwen2", "qwen3")
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' names; index = whether the layer slides
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelArgs:
    model_type: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096  # hidden_size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # < n_heads: grouped-query attention
    head_dim: int = 128
    intermediate_size: int = 11008
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear" | "llama3", ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 always, Llama and Qwen3 when attention_bias
    o_bias: bool = False  # attention_bias (Llama, Qwen3) also covers o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of the queries and keys, before RoPE
    sliding_window: int | None = None  # keys at most this many positions back; None means full attention
    full_attention_layers: tuple[int, ...] = ()  # layers that ignore sliding_window (Qwen's unwindowed ones)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None  # the checkpoint's own dtype, e.g. "bfloat16"
    quantization: CheckpointQuant | None = None  # AWQ / GPTQ checkpoints (config.json's quantization_config)
    # GGUF files: per decoder layer, the GGML type name of each linear in quantization.LINEARS' order (a file's
    # layers may differ: Q4_K_M keeps some layers' attn_v / ffn_down in Q6_K); they stay packed (model/ggml.py)
    ggml_types: tuple[tuple[str, ...], ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.n_heads}) is not a multiple of num_key_value_heads "
                f"({self.n_kv_heads}); fix config.json"
            )

    # --- derived sizes and attention

    def slides(self, layer: int) -> bool:
        """Whether decoder layer `layer` attends through the sliding window."""
        return self.sliding_window is not None and layer not in self.full_attention_layers

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names (relative to `model.layers.{i}.`) and shapes of one decoder layer's tensors."""
        d, f = self.dim, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {
            "input_layernorm.weight": (d,),
            "self_attn.q_proj.weight": (self.q_size, d),
            "self_attn.k_proj.weight": (self.kv_size, d),
            "self_attn.v_proj.weight": (self.kv_size, d),
            "self_attn.o_proj.weight": (d, self.q_size),
            "post_attention_layernorm.weight": (d,),
            "mlp.gate_proj.weight": (f, d),
            "mlp.up_proj.weight": (f, d),
            "mlp.down_proj.weight": (d, f),
        }
        if self.qk_norm:
            shapes["self_attn.q_norm.weight"] = (self.head_dim,)
            shapes["self_attn.k_norm.weight"] = (self.head_dim,)
        if self.qkv_bias:
            shapes["self_attn.q_proj.bias"] = (self.q_size,)
            shapes["self_attn.k_proj.bias"] = (self.kv_size,)
            shapes["self_attn.v_proj.bias"] = (self.kv_size,)
        if self.o_bias:
            shapes["self_attn.o_proj.bias"] = (d,)
        if self.mlp_bias:
            shapes["mlp.gate_proj.bias"] = (f,)
            shapes["mlp.up_proj.bias"] = (f,)
            shapes["mlp.down_proj.bias"] = (d,)
        return shapes

    def global_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the tensors outside the decoder layers (full checkpoint names)."""
        shapes = {
            "model.embed_tokens.weight": (self.vocab_size, self.dim),
            "model.norm.weight": (self.dim,),
        }
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.dim)
        return shapes

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        shapes = dict(self.global_shapes())
        for i in range(self.n_layers):
            for name, shape in self.layer_shapes().items():
                shapes[f"model.layers.{i}.{name}"] = shape
        return shapes

    def layer_numel(self) -> int:
        return sum(_numel(s) for s in self.layer_shapes().values())

    def global_numel(self) -> int:
        return sum(_numel(s) for s in self.global_shapes().values())

    def n_params(self) -> int:
        return self.global_numel() + self.n_layers * self.layer_numel()

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.n_layers * self.kv_size * dtype.itemsize

    # --- construction

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], where: str = "config.json") -> "ModelArgs":
        _check_fields(cfg, where)
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported; supported model types: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            dim = int(cfg["hidden_size"])
            n_heads = int(cfg["num_attention_heads"])
            n_layers = int(cfg["num_hidden_layers"])
            vocab_size = int(cfg["vocab_size"])
            intermediate_size = int(cfg["intermediate_size"])
        except KeyError as e:
            raise ConfigError(f"config.json lacks {e.args[0]!r}; is this a complete HF config?") from None
        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ConfigError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
        n_kv_heads = int(cfg.get("num_key_value_heads") or n_heads)
        # Qwen3Config's head_dim defaults to 128 whatever the hidden size; the others derive it.
        head_dim = int(cfg.get("head_dim") or (128 if model_type == "qwen3" else dim // n_heads))
        rope_theta, rope_scaling = _rope_from_config(cfg)
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        sliding_window, full_layers = _windows_from_config(cfg, model_type, n_layers)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        known = {f.name for f in dataclasses.fields(cls)}
        args = cls(
            model_type=model_type,
            vocab_size=vocab_size,
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            intermediate_size=intermediate_size,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
            full_attention_layers=full_layers,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            extra={k: v for k, v in cfg.items() if k not in known},
        )
        # --- quantized checkpoints (model/quantization.py)
        if cfg.get("quantization_config") is not None:
            widths = input_widths(args.dim, args.q_size, args.intermediate_size)
            args = args.replace(quantization=parse_quantization_config(cfg["quantization_config"], widths))
        return args

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise MissingFileError(f"{path} not found: a model directory needs the config.json of its checkpoint")
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-download the checkpoint") from None
        return cls.from_hf_config(cfg, where=str(path))

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        """Published shapes (random weights are built from these for profiling and benchmarks)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name])

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json fields of a transformers model of this shape (from_hf_config reads them back)."""
        cfg: dict[str, Any] = {
            "model_type": self.model_type, "vocab_size": self.vocab_size, "hidden_size": self.dim,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu", "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else
            (self.eos_token_ids[0] if self.eos_token_ids else None),
        }
        if self.rope_scaling is not None:
            cfg["rope_scaling"] = dict(self.rope_scaling)
        if self.model_type != "qwen2":
            cfg["attention_bias"] = self.qkv_bias
            cfg["mlp_bias"] = self.mlp_bias
        if self.sliding_window is not None:
            cfg["sliding_window"] = self.sliding_window
            if self.model_type in QWEN_TYPES:
                cfg["use_sliding_window"] = True
                cfg["layer_types"] = [LAYER_TYPES[self.slides(i)] for i in range(self.n_layers)]
        return cfg


def _windows_from_config(cfg: dict[str, Any], model_type: str, n_layers: int) -> tuple[int | None, tuple[int, ...]]:
    """(sliding_window, layers that attend fully) as transformers' config classes decide them."""
    window = cfg.get("sliding_window")
    if model_type == "llama" or (model_type in QWEN_TYPES and not cfg.get("use_sliding_window", False)):
        window = None
    if window is None:
        return None, ()
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"sliding_window must be a whole number >= 1, got {window!r}; fix config.json")
    if model_type not in QWEN_TYPES:  # Mistral: every layer
        return window, ()
    types = cfg.get("layer_types")
    if types is None:
        first = int(cfg.get("max_window_layers", 28))  # Qwen2Config's and Qwen3Config's default
        types = [LAYER_TYPES[i >= first] for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(
            f"layer_types must list one of {', '.join(LAYER_TYPES)} for each of the {n_layers} layers; fix config.json"
        )
    full = tuple(i for i, t in enumerate(types) if t == "full_attention")
    # No layer slides (Qwen2.5's max_window_layers exceeds its depth): plain full attention.
    return (None, ()) if len(full) == n_layers else (window, full)


# The fields from_hf_config reads, by the kind of value each must hold (a missing required one is reported there).
_WHOLE_FIELDS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
_NUMBER_FIELDS = ("rms_norm_eps", "rope_theta")
_FLAG_FIELDS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")
_DICT_FIELDS = ("rope_scaling", "rope_parameters")


def _check_fields(cfg: Any, where: str) -> None:
    """Every field the runtime reads holds a value of its kind, so a bad one is named (with its file) here
    rather than failing as a bare TypeError / ValueError deep inside the model's construction."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where} holds a JSON {type(cfg).__name__}, not an object; re-download the checkpoint")

    def bad(key: str, kind: str) -> ConfigError:
        return ConfigError(f"{where}: {key} must be {kind}, got {cfg[key]!r}"[:300] + "; fix config.json")

    for key in _WHOLE_FIELDS:
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise bad(key, "a whole number >= 1")
    for key in _NUMBER_FIELDS:
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise bad(key, "a number > 0")
    for key in _FLAG_FIELDS:
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise bad(key, "true or false")
    for key in _DICT_FIELDS:
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise bad(key, "an object")
    for key in ("bos_token_id", "eos_token_id"):
        v = cfg.get(key)
        ids = v if isinstance(v, list) and key == "eos_token_id" else [v]
        if v is not None and not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise bad(key, "a token id" + (" or a list of them" if key == "eos_token_id" else ""))


def _rope_from_config(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or None
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is None:
        return theta, None
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", "default")
    scaling.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    need = ("factor",) if rope_type == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in need if k not in scaling]
    if missing:
        raise ConfigError(f"rope_scaling of type {rope_type!r} lacks {', '.join(missing)}; fix config.json")
    return theta, {"rope_type": rope_type, **scaling}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --- presets: published shapes, and tiny ones for tests
#
# Each family's shared fields are written once; every shape is as the repo's config.json publishes it
# (max_position_embeddings: the instruct repo's where base and instruct differ).


def _llama3(rope_factor: float, **shape: Any) -> dict[str, Any]:
    """Llama 3.1 / 3.2 / 3.3 (and the DeepSeek-R1 Llama distills): llama3 RoPE scaling, 128k context."""
    rope = {"rope_type": "llama3", "factor": rope_factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    return {**dict(vocab_size=128256, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
                   rope_theta=500000.0, rope_scaling=rope), **shape}


def _qwen2(**shape: Any) -> dict[str, Any]:
    """Qwen2.5 (and the DeepSeek-R1 Qwen distills): q/k/v biases, no sliding window in use."""
    return {**dict(model_type="qwen2", head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-6,
                   rope_theta=1000000.0, qkv_bias=True), **shape}


def _qwen3(**shape: Any) -> dict[str, Any]:
    """Qwen3 dense: per-head q/k RMSNorm, head_dim 128 whatever the width."""
    return {**dict(model_type="qwen3", head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                   rms_norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True), **shape}


_QWEN25_SMALL = dict(vocab_size=151936, tie_word_embeddings=True)  # 0.5B to 3B tie their embeddings
_QWEN25_LARGE = dict(vocab_size=152064)  # 7B and up pad the same vocabulary to 152064 rows
_R1_QWEN = dict(max_position_embeddings=131072)
# Llama 3.1 / 3.3 and the R1 Llama distills share these (3.3-70B and Distill-Llama-70B keep 3.1-70B's shapes)
_LLAMA31_8B = _llama3(8.0, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336)
_LLAMA31_70B = _llama3(8.0, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672)

PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, intermediate_size=11008,
                       vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-2-13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, head_dim=128, intermediate_size=13824,
                        vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128, intermediate_size=28672,
                        vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, intermediate_size=14336,
                       vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "llama-3-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128, intermediate_size=28672,
                        vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "llama-3.1-8b": _LLAMA31_8B,
    "llama-3.1-70b": _LLAMA31_70B,
    "llama-3.2-1b": _llama3(32.0, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, intermediate_size=8192,
                            tie_word_embeddings=True),
    "llama-3.2-3b": _llama3(32.0, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, intermediate_size=8192,
                            tie_word_embeddings=True),
    "llama-3.3-70b": _LLAMA31_70B,
    "mistral-7b": dict(model_type="mistral", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                       intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768,
                       rope_theta=1000000.0),
    # v0.1: the same shapes, RoPE theta 10000 and a 4096-token sliding window on every layer
    "mistral-7b-v0.1": dict(model_type="mistral", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                            intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768,
                            sliding_window=4096),
    "qwen2-7b": dict(model_type="qwen2", dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, head_dim=128,
                     intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768,
                     rope_theta=1000000.0, qkv_bias=True),
    "qwen2.5-0.5b": _qwen2(dim=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64, intermediate_size=4864,
                           **_QWEN25_SMALL),
    "qwen2.5-1.5b": _qwen2(dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, intermediate_size=8960, **_QWEN25_SMALL),
    "qwen2.5-3b": _qwen2(dim=2048, n_layers=36, n_heads=16, n_kv_heads=2, intermediate_size=11008, **_QWEN25_SMALL),
    "qwen2.5-7b": _qwen2(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, intermediate_size=18944, **_QWEN25_LARGE),
    "qwen2.5-14b": _qwen2(dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, intermediate_size=13824, **_QWEN25_LARGE),
    "qwen2.5-32b": _qwen2(dim=5120, n_layers=64, n_heads=40, n_kv_heads=8, intermediate_size=27648, **_QWEN25_LARGE),
    "qwen2.5-72b": _qwen2(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=29568, **_QWEN25_LARGE),
    "qwen3-0.6b": _qwen3(dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, intermediate_size=3072,
                         tie_word_embeddings=True),
    "qwen3-1.7b": _qwen3(dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, intermediate_size=6144,
                         tie_word_embeddings=True),
    "qwen3-4b": _qwen3(dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, intermediate_size=9728,
                       tie_word_embeddings=True),
    "qwen3-8b": _qwen3(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, intermediate_size=12288),
    "qwen3-14b": _qwen3(dim=5120, n_layers=40, n_heads=40, n_kv_heads=8, intermediate_size=17408),
    "qwen3-32b": _qwen3(dim=5120, n_layers=64, n_heads=64, n_kv_heads=8, intermediate_size=25600),
    # DeepSeek-R1 distills: the Llama ones keep their base's shapes; the Qwen ones are built on Qwen2.5-Math-1.5B
    # and -7B (RoPE theta 10000, and the 1.5B unties its embeddings) and on Qwen2.5-14B and -32B.
    "deepseek-r1-distill-llama-8b": _LLAMA31_8B,
    "deepseek-r1-distill-llama-70b": _LLAMA31_70B,
    "deepseek-r1-distill-qwen-1.5b": _qwen2(dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, intermediate_size=8960,
                                            vocab_size=151936, rope_theta=10000.0, **_R1_QWEN),
    "deepseek-r1-distill-qwen-7b": _qwen2(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, intermediate_size=18944,
                                          rope_theta=10000.0, **_QWEN25_LARGE, **_R1_QWEN),
    "deepseek-r1-distill-qwen-14b": _qwen2(dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, intermediate_size=13824,
                                           rms_norm_eps=1e-5, **_QWEN25_LARGE, **_R1_QWEN),
    "deepseek-r1-distill-qwen-32b": _qwen2(dim=5120, n_layers=64, n_heads=40, n_kv_heads=8, intermediate_size=27648,
                                           rms_norm_eps=1e-5, **_QWEN25_LARGE, **_R1_QWEN),
    # ~100M parameters: the CPU benchmark's random model
    "bench-100m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64, intermediate_size=2048,
                       vocab_size=32000, max_position_embeddings=2048),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=128,
                 vocab_size=256, max_position_embeddings=512),
}
