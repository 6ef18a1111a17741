#!/usr/bin/env python3
"""Rebuild the bundled demo model pair (offload_runtime/demo/{target,draft}) from scratch, deterministically.

    python tools/train_demo_pair.py           # full run: ~45 min on 2 idle CPU cores (69 min measured on
                                              # cores shared with other jobs)
    python tools/train_demo_pair.py --quick   # smoke run of every stage in a few minutes (tiny models),
                                              # written to tools/_work/quick/demo, not to the package

Stages: fetch the corpus (KJV text from Debian's bible-kjv-text, see demo_recipe/corpus.py) -> hold out
every 20th chapter -> byte-level BPE tokenizer -> target LlamaForCausalLM trained on plain chapters plus
chat-formatted excerpts -> draft distilled from the saved target -> held-out evaluation -> float16 HF
checkpoints, training_report.json and the model card README.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from demo_recipe import card, corpus, data, evaluate, train  # noqa: E402
from demo_recipe.tokenizer import BOS_ID, END_ID, UNK_ID, check_hf_tokenizer, save_hf_tokenizer, train_tokenizer  # noqa: E402

SAVE_DTYPE = torch.float16  # as Llama-2-70B's published checkpoint


# --- the two recipes

def _llama(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", initializer_range=0.02,
                tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                bos_token_id=BOS_ID, eos_token_id=END_ID, pad_token_id=None)


@dataclass(frozen=True)
class Recipe:
    vocab_size: int
    block: int  # training context length
    batch: int
    target: dict
    draft: dict
    target_schedule: train.Schedule
    draft_schedule: train.Schedule
    chat_per_chapter: int = 3  # chat excerpts drawn per training chapter per epoch (~1/3 of the tokens)
    heldout_every: int = 20
    eval_rows: int | None = None  # None: every held-out row
    rollout_prompts: int = 48  # per format (plain and chat)
    rollout_tokens: int = 64
    sample_tokens: int = 120
    width: int = 8  # ranks reported in the greedy acceptance histograms
    extra: dict = field(default_factory=dict)


FULL = Recipe(
    vocab_size=4096, block=512, batch=8,
    # GQA (6 query heads sharing 2 KV heads) as in Llama-2-70B, so that code path runs on the demo too.
    target=_llama(hidden=384, layers=6, heads=6, kv_heads=2, intermediate=1024, vocab=4096),
    # The draft is 5% of the target. A 12% one (hidden 128) distilled to within 4% of the target's perplexity
    # (p[1] 0.82), too close to show what the target adds; this one gives up some acceptance (p[1] 0.75)
    # for a clear gap (0.14 nats/token).
    draft=_llama(hidden=64, layers=2, heads=2, kv_heads=2, intermediate=192, vocab=4096),
    target_schedule=train.Schedule(steps=480, peak_lr=2e-3, warmup=40),
    draft_schedule=train.Schedule(steps=300, peak_lr=3e-3, warmup=30),
)
QUICK = Recipe(
    vocab_size=4096, block=128, batch=4,
    target=_llama(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=4096),
    draft=_llama(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64, vocab=4096),
    target_schedule=train.Schedule(steps=40, peak_lr=3e-3, warmup=5),
    draft_schedule=train.Schedule(steps=30, peak_lr=3e-3, warmup=5),
    eval_rows=32, rollout_prompts=4, rollout_tokens=16, sample_tokens=24,
)


# --- helpers

def log(message: str) -> None:
    print(message, flush=True)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(model: LlamaForCausalLM, out_dir: Path) -> None:
    """float16 safetensors + config.json + generation_config.json, as the HF Llama-2 checkpoints."""
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=END_ID, pad_token_id=UNK_ID,
        do_sample=True, temperature=0.7, top_p=0.9, max_length=model.config.max_position_embeddings,
    )
    model.to(SAVE_DTYPE).save_pretrained(str(out_dir), safe_serialization=True)
    model.to(torch.float32)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"], config
    # transformers 5 writes "dtype"; readers written for 4.x (and Llama-2's own config) use "torch_dtype".
    config.setdefault("dtype", "float16")
    config.setdefault("torch_dtype", "float16")
    # Llama-2's config.json (and transformers 4.x) spell the RoPE base as a top-level rope_theta.
    config.setdefault("rope_theta", config.get("rope_parameters", {}).get("rope_theta", 10000.0))
    assert config["dtype"] == config["torch_dtype"] == "float16", config
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    assert (out_dir / "model.safetensors").exists() and (out_dir / "generation_config.json").exists()
    for path in out_dir.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; package data should be world-readable


def load_checkpoint(out_dir: Path) -> LlamaForCausalLM:
    """The shipped float16 weights, computed in float32: what every number in the report refers to."""
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    model.eval()
    return model


def describe(model: LlamaForCausalLM, out_dir: Path) -> dict[str, object]:
    c = model.config
    embed = c.vocab_size * c.hidden_size
    return {
        "parameters": n_params(model), "parameters_without_embeddings": n_params(model) - 2 * embed,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "layers": c.num_hidden_layers,
        "attention_heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
        "head_dim": c.hidden_size // c.num_attention_heads, "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings, "dtype": "float16",
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(out_dir.iterdir())},
    }


def reused_target_training(out: Path, recipe: Recipe, seed: int) -> dict[str, object]:
    """The training record of the target already in `out`, after checking it is this recipe's target."""
    report_path, target_dir = out / "training_report.json", out / "target"
    if not report_path.exists() or not (target_dir / "model.safetensors").exists():
        raise SystemExit(f"--reuse-target: {out} has no earlier target and training_report.json; run without it")
    previous = json.loads(report_path.read_text())
    saved = json.loads((target_dir / "config.json").read_text())
    differs = {k: (saved.get(k), v) for k, v in recipe.target.items() if k != "rope_theta" and saved.get(k) != v}
    recorded = previous["models"]["target"]["files"]["model.safetensors"]["sha256"]
    if differs or previous["seed"] != seed or recorded != sha256_file(target_dir / "model.safetensors"):
        raise SystemExit(f"--reuse-target: the target in {target_dir} is not this recipe's (config differences "
                         f"{differs}, seed {previous['seed']} vs {seed}, or weights not those of its report); "
                         "run without --reuse-target")
    return previous["training"]["target"]


def set_determinism(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # tokenizers' trainer pool


# --- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps: a smoke run of every stage")
    parser.add_argument("--out", type=Path, help="output folder (default: offload_runtime/demo, or "
                        "tools/_work/quick/demo with --quick)")
    parser.add_argument("--work", type=Path, default=TOOLS / "_work", help="download and scratch folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (fixed: results depend on it)")
    parser.add_argument("--reuse-target", action="store_true",
                        help="keep the target checkpoint already in the output folder (it must match this recipe and "
                        "its training_report.json) and redo only the draft and the evaluation; the result equals a "
                        "full run, since the draft's initialisation and data are seeded apart from the target's")
    parser.add_argument("--note", default="", help="free text on the build conditions (e.g. shared cores), "
                        "kept in the report and the card")
    parser.add_argument("--card-only", action="store_true",
                        help="only re-render README.md from the training_report.json already in the output folder")
    args = parser.parse_args(argv)
    recipe = QUICK if args.quick else FULL
    out = args.out or (args.work / "quick" / "demo" if args.quick else REPO / "offload_runtime" / "demo")
    if args.card_only:
        card.write_card(out / "README.md", json.loads((out / "training_report.json").read_text()))
        log(f"wrote {out / 'README.md'}")
        return 0
    set_determinism(args.threads)
    wall: dict[str, float] = {}
    t_all = time.perf_counter()

    # corpus
    t = time.perf_counter()
    kjv = corpus.fetch_corpus(args.work / "corpus")
    train_ch, held_ch = corpus.split_chapters(kjv.chapters, recipe.heldout_every)
    wall["corpus_s"] = round(time.perf_counter() - t, 1)
    log(f"corpus: {len(kjv.text)} bytes, {len(kjv.chapters)} chapters ({len(train_ch)} train, {len(held_ch)} held out)")

    # tokenizer, saved identically next to both models
    t = time.perf_counter()
    tok = train_tokenizer((data.chapter_text(c) for c in train_ch), recipe.vocab_size)
    target_dir, draft_dir = out / "target", out / "draft"
    for d in (target_dir, draft_dir):
        save_hf_tokenizer(tok, d, model_max_length=recipe.target["max_position_embeddings"])
    hf_tok = AutoTokenizer.from_pretrained(str(target_dir))
    tok_check = check_hf_tokenizer(target_dir, [held_ch[0].verses[0], "Plain ASCII, unicode: caf\u00e9 \u2713 \U0001f600.\n"])
    assert sha256_file(target_dir / "tokenizer.json") == sha256_file(draft_dir / "tokenizer.json")
    wall["tokenizer_s"] = round(time.perf_counter() - t, 1)

    plain = data.encode_plain(tok, train_ch)
    held_rows = data.pack(data.encode_plain(tok, held_ch), recipe.block)
    if recipe.eval_rows is not None:
        held_rows = held_rows[:recipe.eval_rows]
    plain_tokens = sum(len(d) for d in plain)
    log(f"tokens: {plain_tokens} in training chapters, {held_rows[:, 1:].numel()} held-out targets")

    # target
    if args.reuse_target:
        target_train = reused_target_training(out, recipe, args.seed)
        log(f"target: reusing {target_dir} (trained in {target_train['wall_s'] / 60:.1f} min by an earlier run)")
    else:
        log(f"target: {recipe.target_schedule.steps} steps of {recipe.batch}x{recipe.block} tokens")
        torch.manual_seed(args.seed)  # LlamaForCausalLM's initialiser reads the global generator
        target = LlamaForCausalLM(LlamaConfig(**recipe.target))
        batches = data.training_batches(tok, train_ch, plain, recipe.chat_per_chapter, recipe.block, recipe.batch,
                                        torch.Generator().manual_seed(args.seed + 1))
        target_train = train.train(target, batches, recipe.target_schedule, log=log)
        save_checkpoint(target, target_dir)
        del target

    # draft, distilled from the shipped target
    log(f"draft: {recipe.draft_schedule.steps} steps of {recipe.batch}x{recipe.block} tokens, distilled")
    teacher = load_checkpoint(target_dir)
    torch.manual_seed(args.seed + 2)
    draft = LlamaForCausalLM(LlamaConfig(**recipe.draft))
    batches = data.training_batches(tok, train_ch, plain, recipe.chat_per_chapter, recipe.block, recipe.batch,
                                    torch.Generator().manual_seed(args.seed + 3))
    draft_train = train.train(draft, batches, recipe.draft_schedule, teacher=teacher, log=log)
    save_checkpoint(draft, draft_dir)
    del draft, teacher

    # evaluation of the shipped checkpoints
    t = time.perf_counter()
    target, draft = load_checkpoint(target_dir), load_checkpoint(draft_dir)
    unigram = evaluate.unigram_log_probs(plain, recipe.vocab_size)
    heldout = evaluate.heldout_stats(target, draft, held_rows, recipe.batch, unigram, recipe.width)
    log(f"held-out: perplexity {heldout['perplexity']}, greedy p[1..] {heldout['greedy_rank_histogram']}")
    step = max(1, len(held_ch) // recipe.rollout_prompts)
    prompt_chapters = held_ch[::step][:recipe.rollout_prompts]
    plain_prompts = [hf_tok(c.verses[0])["input_ids"] for c in prompt_chapters]
    chat_prompts = [list(hf_tok.apply_chat_template([{"role": "user", "content": c.verses[0]}],
                                                    add_generation_prompt=True, tokenize=True)["input_ids"])
                    for c in prompt_chapters]
    rollouts = {name: evaluate.rollout_ranks(target, draft, prompts, recipe.rollout_tokens, END_ID, recipe.width)
                for name, prompts in (("plain", plain_prompts), ("chat", chat_prompts))}
    log(f"greedy rollouts: {json.dumps(rollouts)}")
    fp16_range = {"target": evaluate.activation_range(target, held_rows[:2]),
                  "draft": evaluate.activation_range(draft, held_rows[:2])}

    samples = []
    sample_chapters = [held_ch[len(held_ch) // 4], held_ch[len(held_ch) // 2], held_ch[3 * len(held_ch) // 4]]
    sample_prompts = [
        ("plain", " ".join(sample_chapters[0].verses[0].split()[:6])),
        ("plain", " ".join(sample_chapters[1].verses[0].split()[:6])),
        ("chat", sample_chapters[2].verses[0]),
    ]
    for i, (kind, text) in enumerate(sample_prompts):
        ids = (hf_tok(text)["input_ids"] if kind == "plain" else
               list(hf_tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=True)["input_ids"]))
        entry: dict[str, object] = {"format": kind, "prompt": text, "temperature": 0.7, "top_p": 0.9,
                                    "seed": args.seed + 100 + i}
        for name, model in (("target", target), ("draft", draft)):
            new = evaluate.generate(model, ids, recipe.sample_tokens, 0.7, 0.9,
                                    torch.Generator().manual_seed(args.seed + 100 + i), END_ID)
            entry[name] = hf_tok.decode(new, skip_special_tokens=True)
            entry[f"{name}_stopped"] = bool(new and new[-1] == END_ID)
        samples.append(entry)
        log(f"sample {i + 1} ({kind}): {text!r} -> {entry['target']!r}")
    wall["evaluation_s"] = round(time.perf_counter() - t, 1)
    wall["target_training_s"] = target_train["wall_s"]
    wall["draft_training_s"] = draft_train["wall_s"]
    # With --reuse-target the target's training time (from the earlier run) is added: the total is a full build's.
    wall["total_s"] = round(time.perf_counter() - t_all + (target_train["wall_s"] if args.reuse_target else 0.0), 1)

    report = {
        "recipe": "quick" if args.quick else "full",
        "command": "python tools/train_demo_pair.py" + (" --quick" if args.quick else "")
                   + (f" --seed {args.seed}" if args.seed else "") + (f" --threads {args.threads}" if args.threads != 2 else ""),
        "seed": args.seed,
        "target_reused_from_earlier_run": args.reuse_target,
        "build_note": args.note,
        "corpus": {
            "name": "King James Version of the Bible (1611), KJV text as dumped by Debian's bible-kjv reader",
            "debian_packages": corpus.PACKAGES, "licence": corpus.LICENCE,
            "text_sha256": kjv.sha256, "bytes": len(kjv.text), "words": len(kjv.text.split()),
            "verses": sum(len(c.verses) for c in kjv.chapters), "chapters": len(kjv.chapters),
            "heldout": f"every {recipe.heldout_every}th chapter (index % {recipe.heldout_every} == "
                       f"{recipe.heldout_every // 2}), whole chapters",
            "train_chapters": len(train_ch), "heldout_chapters": len(held_ch),
            "train_plain_tokens": plain_tokens, "heldout_tokens": heldout["tokens"],
        },
        "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab_size": tok.get_vocab_size(),
                      "special_tokens": {"<unk>": UNK_ID, "<s>": BOS_ID, "<|end|> (eos)": END_ID,
                                         "<|system|>": 3, "<|user|>": 4, "<|assistant|>": 5},
                      "chat_example": tok_check["rendered_chat_example"]},
        "recipe_settings": {k: v for k, v in asdict(recipe).items() if k not in ("target", "draft", "extra")},
        "models": {"target": describe(target, target_dir), "draft": describe(draft, draft_dir)},
        "training": {"target": target_train, "draft": draft_train,
                     "data": f"{recipe.batch} x {recipe.block} token rows packed from plain chapters plus "
                             f"{recipe.chat_per_chapter} chat excerpts per chapter per epoch"},
        "evaluation": {"heldout": heldout, "greedy_rollouts": rollouts, "max_abs_hidden_state": fp16_range},
        "samples": samples,
        "wall_time_s": wall,
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "tokenizers": tokenizers.__version__, "threads": args.threads,
                        "python": platform.python_version(), "machine": platform.machine(),
                        "cpu": platform.processor() or "unknown"},
    }
    report["total_bytes"] = sum(p.stat().st_size for d in (target_dir, draft_dir) for p in d.iterdir())
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    card.write_card(out / "README.md", report)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"wrote {out}: {total / 1e6:.2f} MB in all, {wall['total_s'] / 60:.1f} min")
    if total > 40e6:
        log("WARNING: the demo pair exceeds the 40 MB budget")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
