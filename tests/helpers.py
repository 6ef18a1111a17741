"""Tiny real checkpoints for tests: transformers models saved with save_pretrained, tokenizers built offline."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

CONFIGS: dict[str, dict[str, Any]] = {
    "llama-mha": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=128, max_position_embeddings=256),
    "llama-gqa-llama3": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                             num_attention_heads=8, num_key_value_heads=2, vocab_size=128,
                             max_position_embeddings=512, rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "llama-tied-bias-linear": dict(model_type="llama", hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=96,
                                   max_position_embeddings=256, tie_word_embeddings=True, attention_bias=True,
                                   rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral-gqa": dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=512,
                        sliding_window=None, rope_theta=1000000.0),
    "qwen2-bias": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=512),
}

ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_config(name: str, **overrides: Any):
    import transformers

    cfg = {**CONFIGS[name], **overrides}
    model_type = cfg.pop("model_type")
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[model_type]
    cfg.setdefault("initializer_range", 0.15)  # larger than usual, so random logits carry signal
    return cls(bos_token_id=1, eos_token_id=2, pad_token_id=0, **cfg)


def make_checkpoint(path: Path, name: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                    max_shard_size: str | None = None, **overrides: Any) -> Path:
    """Save a random transformers model of config `name` to `path`; returns path."""
    import transformers

    config = hf_config(name, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, ARCHS[config.model_type])(config).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return Path(path)


def reference_model(path: Path, dtype: torch.dtype = torch.float64):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return model.to(dtype).eval()


def make_tokenizer(path: Path, vocab_size: int) -> None:
    """A tiny word-level tokenizer (with a chat template) whose ids fit in `vocab_size`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
    words += [w for w in ("the a an and of to in is it that was he she they for on with as at by this "
                          "one two three cat dog sat ran mat house tree red blue green big small hello world "
                          "what where who how why yes no good bad day night sun moon star water fire").split()]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    vocab = {w: i for i, w in enumerate(words[:vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    fast.save_pretrained(path)


def write_generation_config(path: Path, **fields: Any) -> None:
    (Path(path) / "generation_config.json").write_text(json.dumps(fields))


# --- statistics

# Statistical tests compare counts from fixed seeds with a chi-square test. A correct sampler must
# give p > ALPHA; each test also runs a plausible wrong sampler through the same check and asserts
# p < ALPHA, which proves the sample size is large enough for the test to fail.
ALPHA = 1e-4


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit of `counts` to `probs` (flattened).

    A count in a cell of probability 0 is impossible under `probs`: p-value 0. Cells whose expected
    count is below `min_expected` are pooled into one, so the chi-square approximation holds.
    """
    counts = counts.flatten().to(torch.float64)
    probs = probs.flatten().to(torch.float64)
    assert counts.shape == probs.shape
    if bool((counts[probs == 0] > 0).any()):
        return 0.0
    total = float(counts.sum())
    expected = probs / probs.sum() * total
    small = expected < min_expected
    cells_obs = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    cells_exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = cells_exp > 0
    cells_obs, cells_exp = cells_obs[keep], cells_exp[keep]
    dof = cells_obs.numel() - 1
    assert dof >= 1, "need at least two cells with mass"
    stat = float(((cells_obs - cells_exp) ** 2 / cells_exp).sum())
    # chi-square survival function: regularised upper incomplete gamma Q(dof / 2, stat / 2)
    half = torch.tensor([dof / 2, stat / 2], dtype=torch.float64)
    return float(torch.special.gammaincc(half[0], half[1]))


# --- tools


def load_tool(name: str):
    """A script of tools/ as a module (tools are scripts, not part of the package)."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


# --- command lines, driven as users drive them

CLI_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_cli(module: str, *args: Any, stdin: str | bytes = "", env: dict[str, str] | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess:
    """`python -m module args` with `stdin` piped in; stdout and stderr come back as text."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], input=data, capture_output=True,
                          timeout=timeout, env={**CLI_ENV, **(env or {})})
    proc.stdout, proc.stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    return proc


def one_line_error(proc: subprocess.CompletedProcess, code: int, pattern: str) -> str:
    """Assert the command failed with `code` and one error line (its last) holding `pattern`; returns that line."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and pattern in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[-1]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """One JSON value per line (a str row is written as it is, e.g. a malformed line)."""
    path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]
