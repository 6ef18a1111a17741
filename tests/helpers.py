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
    # head_dim 24 is not hidden_size / heads (16), as in Qwen3 (1024 wide, 16 heads of 128)
    "qwen3-qk-norm": dict(model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=128,
                          max_position_embeddings=512),
}

ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "qwen3": "Qwen3ForCausalLM"}


def hf_config(name: str, **overrides: Any):
    import transformers

    cfg = {**CONFIGS[name], **overrides}
    model_type = cfg.pop("model_type")
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[model_type]
    cfg.setdefault("initializer_range", 0.15)  # larger than usual, so random logits carry signal
    return cls(bos_token_id=1, eos_token_id=2, pad_token_id=0, **cfg)


def make_checkpoint(path: Path, name: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                    max_shard_size: str | None = None, **overrides: Any) -> Path:
    """Save a random transformers model of config `name` to `path`; returns path."""
    import transformers

    config = hf_config(name, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, ARCHS[config.model_type])(config).to(dtype)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            # Norms start at ones, under which a per-head norm commutes with RoPE (a rotation keeps the RMS):
            # random q/k norm weights make the order matter, so a test can tell it.
            if pname.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return Path(path)


def make_truncated_draft(target: Path, path: Path, name: str, n_layers: int = 1, noise: float = 0.02,
                         seed: int = 5, vocab_size: int | None = None, **overrides: Any) -> Path:
    """A draft made from `target`: its first `n_layers` layers and (the first `vocab_size` rows of) its
    embeddings, each weight noised, so the draft agrees with the target often but not always."""
    from safetensors.torch import load_file, save_file

    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    make_checkpoint(path, name, num_hidden_layers=n_layers, **overrides)  # config.json; weights replaced below
    weights = load_file(Path(target) / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    kept = {}
    for k, v in weights.items():
        layer = k.split(".")[2] if k.startswith("model.layers.") else None
        if layer is not None and int(layer) >= n_layers:
            continue
        if vocab_size is not None and k in ("model.embed_tokens.weight", "lm_head.weight"):
            v = v[:vocab_size].contiguous()
        kept[k] = v + noise * torch.randn(v.shape, generator=g)
    save_file(kept, Path(path) / "model.safetensors", metadata={"format": "pt"})
    return Path(path)


def reference_model(path: Path, dtype: torch.dtype = torch.float64):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return model.to(dtype).eval()


def make_tokenizer(path: Path, vocab_size: int, renamed: dict[str, str] | None = None) -> None:
    """A tiny word-level tokenizer (with a chat template) whose ids fit in `vocab_size`; `renamed` gives some
    words another spelling at the same id (as the DeepSeek-R1 distills rename their base's special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
    words += [w for w in ("the a an and of to in is it that was he she they for on with as at by this "
                          "one two three cat dog sat ran mat house tree red blue green big small hello world "
                          "what where who how why yes no good bad day night sun moon star water fire").split()]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    words = [(renamed or {}).get(w, w) for w in words]
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
    """A script of tools/ as a module (tools are scripts, not part of the package). tools/ goes on sys.path as
    it does for a script run from there, so the tools' shared modules (harness, report) import the same way."""
    tools = Path(__file__).resolve().parents[1] / "tools"
    if str(tools) not in sys.path:
        sys.path.insert(0, str(tools))
    path = tools / f"{name}.py"
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded  # one module object: another tool imported it already (its classes must be the same)
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


# Counts private memory only: code pages of shared libraries (first touched during a load) and mapped checkpoint
# pages are file-backed page cache, and their count differs between machines and fresh virtual environments by
# tens of MB, while a second copy of the model is anonymous memory. A thread reads it every half millisecond;
# what a load holds for longer than a thread switch (5 ms) is seen.
_PEAK_PROBE = '''
import json as _json, threading as _threading

def _private_bytes():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return sum(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssShmem"))

class _PeakProbe:
    def __init__(self):
        self.base = self.peak = _private_bytes()
        self.done = _threading.Event()
        self.thread = _threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self):
        while not self.done.wait(0.0005):
            self.peak = max(self.peak, _private_bytes())

    def growth(self):
        self.done.set()
        self.thread.join()
        return max(self.peak, _private_bytes()) - self.base
'''


def peak_private_growth(setup: str, measured: str, cwd: Path | None = None, timeout: float = 300) -> dict[str, Any]:
    """Runs `setup` then `measured` (Python source) in a fresh interpreter and returns {"grown": bytes, **result}:
    how far its private memory (anonymous + shared-memory pages) rose above the level after `setup` at its peak
    during `measured`. `measured` may set a dict `result` to return more fields."""
    script = "\n".join([_PEAK_PROBE, setup, "result = {}", "_probe = _PeakProbe()", measured,
                        "print(_json.dumps({'grown': _probe.growth(), **result}))"])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
