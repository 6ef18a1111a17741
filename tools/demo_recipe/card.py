"""The model card (offload_runtime/demo/README.md), rendered from training_report.json.

Sections measured by the runtime and planner, not by this recipe, sit between `<!-- keep:NAME -->` and
`<!-- /keep:NAME -->` markers: a rerun of the recipe keeps whatever an existing card has there."""
from __future__ import annotations

import re
from pathlib import Path

_KEEP = re.compile(r"<!-- keep:(\w+) -->\n(.*?)<!-- /keep:\1 -->", re.S)

_PLACEHOLDERS = {
    "acceptance": (
        "TODO(planner): the measured acceptance vector p[1..W] of this pair at temperature 0 and at 0.6\n"
        "(Sequoia sampling without replacement), with the command that measured it.\n"
    ),
    "tree": (
        "TODO(planner): tokens per step with the planned tree (size n, depth d, expected G(n, d) and the\n"
        "measured tokens per target sweep), with the command and the machine.\n"
    ),
}


def _kept(existing: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in _KEEP.finditer(existing)}


def _block(name: str, kept: dict[str, str]) -> str:
    return f"<!-- keep:{name} -->\n{kept.get(name, _PLACEHOLDERS[name])}<!-- /keep:{name} -->"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def render(report: dict, kept: dict[str, str]) -> str:
    c, tk, m, tr, ev = (report["corpus"], report["tokenizer"], report["models"], report["training"],
                        report["evaluation"])
    t, d = m["target"], m["draft"]
    ppl, nll = ev["heldout"]["perplexity"], ev["heldout"]["nll_nats_per_token"]
    wall = report["wall_time_s"]
    env = report["environment"]
    lines = [
        "# Demo model pair: a tiny Llama target and its draft",
        "",
        "A small *real* model pair shipped with offload-runtime so that every code path (config, safetensors,",
        "tokenizer, chat template, drafting, verification, planning) runs without downloading anything.",
        "Both are `LlamaForCausalLM` checkpoints in the Hugging Face layout of Llama-2 (float16 safetensors,",
        "`config.json`, `generation_config.json`, a shared tokenizer). They write King James English;",
        "they are not useful assistants.",
        "",
        "## Corpus",
        "",
        f"- Text: {c['name']}.",
        "- Source: Debian packages " + ", ".join(f"`{k}={v}`" for k, v in c["debian_packages"].items())
        + " (`apt-get download` + `dpkg-deb -x`, no root; `bible-kjv-text` holds the compressed text,",
        "  `bible-kjv` is the reader that prints it).",
        f"- Licence: {c['licence']}.",
        f"- Size: {c['bytes']:,} bytes, {c['words']:,} words, {c['verses']:,} verses, {c['chapters']:,} chapters;",
        f"  sha256 of the extracted text `{c['text_sha256']}`.",
        f"- Held out: {c['heldout']}: {c['heldout_chapters']} chapters, {c['heldout_tokens']:,} tokens;",
        f"  training: {c['train_chapters']} chapters, {c['train_plain_tokens']:,} tokens as plain text.",
        "- Training data: each chapter as running prose (`<s>` ... `<|end|>`), plus chat excerpts cut from",
        "  the same chapters (user: 1-2 verses, assistant: the next 1-3 verses, some with a system prompt",
        "  or a second exchange), so the target answers after `<|assistant|>` and stops with `<|end|>`.",
        "",
        "## Tokenizer",
        "",
        f"{tk['type']}, {tk['vocab_size']} tokens, trained on the training chapters. Special tokens: "
        + ", ".join(f"`{k}` = {v}" for k, v in tk["special_tokens"].items()) + ".",
        "A plain encode starts with `<s>`. Chat template (in `tokenizer_config.json`), for a system and a user",
        "message with `add_generation_prompt=True`:",
        "",
        "```",
        tk["chat_example"].rstrip("\n"),
        "```",
        "",
        "## Models",
        "",
        _row("", "target", "draft"),
        _row("---", "---", "---"),
        _row("parameters", f"{t['parameters']:,}", f"{d['parameters']:,}"),
        _row("parameters without embeddings", f"{t['parameters_without_embeddings']:,}",
             f"{d['parameters_without_embeddings']:,}"),
        _row("hidden / intermediate", f"{t['hidden_size']} / {t['intermediate_size']}",
             f"{d['hidden_size']} / {d['intermediate_size']}"),
        _row("layers", t["layers"], d["layers"]),
        _row("heads / KV heads / head dim", f"{t['attention_heads']} / {t['kv_heads']} / {t['head_dim']}",
             f"{d['attention_heads']} / {d['kv_heads']} / {d['head_dim']}"),
        _row("max positions (trained on)", f"{t['max_position_embeddings']} ({report['recipe_settings']['block']})",
             f"{d['max_position_embeddings']} ({report['recipe_settings']['block']})"),
        _row("model.safetensors (float16)", _mb(t["files"]["model.safetensors"]["bytes"]),
             _mb(d["files"]["model.safetensors"]["bytes"])),
        _row("training", f"{tr['target']['objective']}, {tr['target']['steps']} steps, "
             f"{tr['target']['tokens_seen']:,} tokens", f"{tr['draft']['objective']}, {tr['draft']['steps']} steps, "
             f"{tr['draft']['tokens_seen']:,} tokens"),
        _row("training wall time", f"{tr['target']['wall_s'] / 60:.1f} min", f"{tr['draft']['wall_s'] / 60:.1f} min"),
        "",
        f"The target uses grouped-query attention ({t['attention_heads']} query heads, {t['kv_heads']} KV heads) as",
        "Llama-2-70B does; the draft uses plain multi-head attention. Embeddings and `lm_head` are untied.",
        f"Largest |hidden state| on held-out text: target {ev['max_abs_hidden_state']['target']}, draft "
        f"{ev['max_abs_hidden_state']['draft']}"
        + (" (far inside float16's range)." if max(ev["max_abs_hidden_state"].values()) < 1e3 else
           " (large: check float16 inference for overflow)."),
        f"Checkpoint and tokenizer files of both models together: {_mb(report['total_bytes'])} (plus this card and",
        "`training_report.json`).",
        "",
        "## Held-out evaluation",
        "",
        "Computed on the shipped float16 weights (run in float32), on the held-out chapters packed into rows",
        f"of {report['recipe_settings']['block']} tokens, same tokenization for all three:",
        "",
        _row("model", "nats / token", "perplexity"),
        _row("---", "---", "---"),
        _row("target", nll["target"], ppl["target"]),
        _row("draft", nll["draft"], ppl["draft"]),
        _row("unigram baseline (add-one, training counts)", nll["unigram"], ppl["unigram"]),
        "",
        "Paired over the {rows} held-out rows, the draft's loss exceeds the target's by {mean} nats/token "
        "(standard error {se}; the target is better on {better} of {rows} rows).".format(
            rows=ev["heldout"]["draft_minus_target_nats"]["rows"], mean=ev["heldout"]["draft_minus_target_nats"]["mean"],
            se=ev["heldout"]["draft_minus_target_nats"]["stderr_over_rows"],
            better=ev["heldout"]["draft_minus_target_nats"]["rows_where_target_better"]),
        "",
        "Greedy agreement: at each held-out position, the rank of the target's argmax in the draft's order",
        "(rank 1 = the draft's first choice is the target's greedy token; this is p[k] for greedy",
        "verification of top-k drafted children):",
        "",
        _row("contexts", "positions", *(f"p[{k}]" for k in range(1, 1 + len(ev["heldout"]["greedy_rank_histogram"])))),
        _row("---", "---", *("---" for _ in ev["heldout"]["greedy_rank_histogram"])),
        _row("held-out text (teacher forced)", f"{ev['heldout']['tokens']:,}", *ev["heldout"]["greedy_rank_histogram"]),
    ]
    for name, r in ev["greedy_rollouts"].items():
        lines.append(_row(f"target's own greedy continuations, {name} prompts ({r['prompts']})", r["positions"],
                          *r["greedy_rank_histogram"]))
    lines += [
        "",
        "### Acceptance vector (measured by the planner)",
        "",
        _block("acceptance", kept),
        "",
        "### Tokens per step with the planned tree",
        "",
        _block("tree", kept),
        "",
        "## Samples from the target",
        "",
        "Temperature 0.7, top-p 0.9, fixed seeds; prompts from held-out chapters.",
        "",
    ]
    for i, s in enumerate(report["samples"], 1):
        kind = "plain text" if s["format"] == "plain" else "chat (user message, then `<|assistant|>`)"
        stop = " [stopped at `<|end|>`]" if s["target_stopped"] else " [length limit]"
        lines += [f"{i}. {kind}, seed {s['seed']}:", "", f"   > **{s['prompt']}**", "",
                  f"   > {s['target'].strip()}{stop}", ""]
    lines += [
        "## Rebuilding",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"Deterministic for a fixed seed and thread count ({env['threads']} threads here): fixed seeds, explicit",
        "`torch.Generator`s for data order and chat excerpts, `torch.use_deterministic_algorithms(True)`.",
        f"Wall time of this build: {wall['total_s'] / 60:.1f} min on {env['threads']} CPU threads "
        f"({env['machine']}; torch {env['torch']}, transformers {env['transformers']}, tokenizers "
        f"{env['tokenizers']}): corpus {wall['corpus_s']} s, tokenizer {wall['tokenizer_s']} s, target "
        f"{wall['target_training_s'] / 60:.1f} min, draft {wall['draft_training_s'] / 60:.1f} min, evaluation "
        f"{wall['evaluation_s']} s. Other versions of torch may give slightly different weights.",
        *([f"Build conditions: {report['build_note']}"] if report.get("build_note") else []),
        "All numbers above are in `training_report.json`, written by the same run.",
        "",
        "## Limitations",
        "",
        f"- Trained on {report['recipe_settings']['block']}-token rows: quality drops past that length although the",
        "  position table allows 1024.",
        "- One book of 17th-century English: the models know its vocabulary and style and nothing else; they",
        "  continue text, they do not follow instructions.",
        "- Weights: derived from a public-domain text; shipped under the project's licence.",
        "",
    ]
    return "\n".join(lines)


def write_card(path: Path, report: dict) -> None:
    kept = _kept(path.read_text()) if path.exists() else {}
    path.write_text(render(report, kept))
