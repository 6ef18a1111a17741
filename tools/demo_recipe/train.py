"""One training loop for both models: next-token cross-entropy (target) or distillation from a frozen
teacher's distribution (draft: KL(P_target || Q_draft), which is what raises the acceptance rates)."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Schedule:
    steps: int
    peak_lr: float
    warmup: int
    final_fraction: float = 0.1  # cosine decay ends at this fraction of peak_lr
    weight_decay: float = 0.1
    clip: float = 1.0


def learning_rate(step: int, s: Schedule) -> float:
    if step < s.warmup:
        return s.peak_lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.peak_lr * (s.final_fraction + (1 - s.final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: torch.nn.Module, s: Schedule) -> torch.optim.Optimizer:
    # Decay matrices only; RMSNorm gains stay undecayed.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": s.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=s.peak_lr, betas=(0.9, 0.95), eps=1e-8)


def _loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
    if teacher_logits is None:
        return F.cross_entropy(student_logits.flatten(0, 1), targets.flatten())
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    log_q = F.log_softmax(student_logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def train(model: torch.nn.Module, batches: Iterator[torch.Tensor], s: Schedule,
          teacher: torch.nn.Module | None = None, log: Callable[[str], None] = print,
          log_every: int = 20) -> dict[str, object]:
    """Train in place; returns the loss curve and timing. With a teacher, the loss is the KL divergence
    from the teacher's next-token distribution; the cross-entropy on the text is logged alongside."""
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    model.train()
    optimizer = _optimizer(model, s)
    curve: list[dict[str, float]] = []
    tokens = 0
    start = time.perf_counter()
    for step in range(s.steps):
        rows = next(batches)
        assert rows.ndim == 2, rows.shape
        inputs, targets = rows[:, :-1], rows[:, 1:]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, s)
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=inputs).logits
        logits = model(input_ids=inputs).logits
        loss = _loss(logits, targets, teacher_logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip)
        optimizer.step()
        tokens += targets.numel()
        if step % log_every == 0 or step == s.steps - 1:
            with torch.no_grad():
                ce = F.cross_entropy(logits.detach().flatten(0, 1), targets.flatten()).item()
            elapsed = time.perf_counter() - start
            curve.append({"step": step, "loss": round(loss.item(), 4), "text_ce": round(ce, 4)})
            log(f"  step {step:5d}/{s.steps}  loss {loss.item():.4f}  text ce {ce:.4f}  "
                f"lr {learning_rate(step, s):.2e}  {tokens / elapsed:.0f} tok/s  {elapsed / 60:.1f} min")
    model.eval()
    wall = time.perf_counter() - start
    return {"steps": s.steps, "tokens_seen": tokens, "wall_s": round(wall, 1), "peak_lr": s.peak_lr,
            "warmup": s.warmup, "weight_decay": s.weight_decay, "curve": curve,
            "objective": "cross-entropy" if teacher is None else "KL(P_target || Q_draft)"}
