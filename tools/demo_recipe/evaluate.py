"""Held-out measurements: perplexities (target, draft, unigram), how often the draft's k-th choice is the
target's greedy token (the temperature-0 acceptance vector for top-k drafting), and sampling."""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# --- sampling (explicit generator; temperature 0 means greedy)


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    assert logits.ndim == 1, logits.shape
    if temperature == 0.0:
        return int(logits.argmax())
    probs = F.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep = (sorted_probs.cumsum(0) - sorted_probs) < top_p
    sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: Sequence[int], max_new: int, temperature: float, top_p: float,
             generator: torch.Generator, stop_id: int) -> list[int]:
    """New tokens after `prompt` (KV-cached), ending at stop_id (included) or after max_new tokens."""
    # transformers 5 renamed past_key_values to cache (argument and output field).
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=torch.tensor([list(prompt)]), use_cache=True)
    new: list[int] = []
    for _ in range(max_new):
        token = pick_token(out.logits[0, -1], temperature, top_p, generator)
        new.append(token)
        if token == stop_id:
            break
        out = model(input_ids=torch.tensor([[token]]), use_cache=True, **{key: getattr(out, key)})
    return new


# --- agreement between draft and target

def draft_rank_of_target_choice(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """1-based rank of the target's argmax token in the draft's descending order, per position.
    Rank k at a position means greedy verification of top-k drafted children accepts the k-th child."""
    assert target_logits.shape == draft_logits.shape, (target_logits.shape, draft_logits.shape)
    choice = target_logits.argmax(-1, keepdim=True)
    return (draft_logits > draft_logits.gather(-1, choice)).sum(-1) + 1


def rank_histogram(ranks: torch.Tensor, width: int) -> list[float]:
    """p[k] for k = 1..width: the fraction of positions whose rank is exactly k."""
    ranks = ranks.flatten()
    return [round(float((ranks == k).float().mean()), 4) for k in range(1, width + 1)]


# --- held-out text

@torch.no_grad()
def heldout_stats(target: torch.nn.Module, draft: torch.nn.Module, rows: torch.Tensor, batch: int,
                  unigram_log_probs: torch.Tensor, width: int) -> dict[str, object]:
    """Teacher-forced on the held-out rows: mean NLL -> perplexity for all three models, and the draft
    rank of the target's argmax at every position."""
    assert rows.ndim == 2, rows.shape
    row_nll: dict[str, list[torch.Tensor]] = {"target": [], "draft": [], "unigram": []}
    ranks = []
    for i in range(0, rows.shape[0], batch):
        inputs, targets = rows[i:i + batch, :-1], rows[i:i + batch, 1:]
        t_logits, d_logits = target(input_ids=inputs).logits, draft(input_ids=inputs).logits
        for name, logits in (("target", t_logits), ("draft", d_logits)):
            per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            row_nll[name].append(per_token.view(targets.shape).mean(1))
        row_nll["unigram"].append(-unigram_log_probs[targets].mean(1))
        ranks.append(draft_rank_of_target_choice(t_logits, d_logits).flatten())
    per_row = {k: torch.cat(v).double() for k, v in row_nll.items()}  # rows have equal length: means average
    gap = per_row["draft"] - per_row["target"]
    all_ranks = torch.cat(ranks)
    return {
        "tokens": int(rows[:, 1:].numel()),
        "nll_nats_per_token": {k: round(float(v.mean()), 4) for k, v in per_row.items()},
        "perplexity": {k: round(math.exp(float(v.mean())), 2) for k, v in per_row.items()},
        # Paired over rows (tokens within a row are correlated, rows much less so): is the gap real?
        "draft_minus_target_nats": {"mean": round(float(gap.mean()), 4),
                                    "stderr_over_rows": round(float(gap.std() / math.sqrt(gap.numel())), 4),
                                    "rows": gap.numel(), "rows_where_target_better": int((gap > 0).sum())},
        "greedy_rank_histogram": rank_histogram(all_ranks, width),
    }


def unigram_log_probs(documents: Sequence[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """Add-one smoothed unigram log-probabilities of the training documents."""
    counts = torch.ones(vocab_size, dtype=torch.float64)
    counts += torch.bincount(torch.tensor([t for d in documents for t in d]), minlength=vocab_size).double()
    return (counts / counts.sum()).log().float()


@torch.no_grad()
def rollout_ranks(target: torch.nn.Module, draft: torch.nn.Module, prompts: Sequence[Sequence[int]],
                  new_tokens: int, stop_id: int, width: int) -> dict[str, object]:
    """Greedy speculative decoding sees contexts the target wrote itself: let the target continue each
    prompt greedily, then measure the draft rank of the target's choice along that path."""
    ranks = []
    unused = torch.Generator().manual_seed(0)  # greedy picks never draw from it
    for prompt in prompts:
        tail = generate(target, prompt, new_tokens, 0.0, 1.0, unused, stop_id)
        seq = torch.tensor([list(prompt) + tail[:-1]])
        first = len(prompt) - 1  # position whose output predicts the first generated token
        t_logits, d_logits = target(input_ids=seq).logits[0, first:], draft(input_ids=seq).logits[0, first:]
        ranks.append(draft_rank_of_target_choice(t_logits, d_logits))
    all_ranks = torch.cat(ranks)
    return {"prompts": len(prompts), "positions": int(all_ranks.numel()),
            "greedy_rank_histogram": rank_histogram(all_ranks, width)}


@torch.no_grad()
def activation_range(model: torch.nn.Module, rows: torch.Tensor) -> float:
    """Largest |hidden state| over all layers on the given rows: shows whether float16 inference is safe."""
    out = model(input_ids=rows[:, :-1], output_hidden_states=True)
    return round(max(float(h.abs().max()) for h in out.hidden_states), 2)
