"""Lossless verification of a drafted token tree against the target's distributions.

The tree is a parent array in breadth-first order: node 0 is the root, whose token is the last token
already accepted; parents[0] == -1 and parents[i] < i; the children of a node appear in index order,
which is the order in which the draft sampled them. The shape may have been grown from the draft's own
probabilities during the step (dynamic trees): `_walk` proves when that stays lossless.

Definitions (the vLLM rejection-sampler vocabulary):
- accepted path: the nodes whose tokens the target accepts, walking down from the root: at each node
  the verifier tries its children in order and moves to the first one it accepts. The root itself is
  not on the path (its token was accepted in an earlier step).
- bonus token: one extra token drawn from the target's residual distribution at the last node of the
  walk (the last accepted node, or the root if nothing was accepted), i.e. what P has become after
  every rejected child there. Each step therefore emits len(path) + 1 >= 1 tokens, distributed
  exactly as if the target had sampled them one by one.

Inputs, shared by every verifier:
- tree: a `Tree` (spec/tree.py; a parent array is accepted and checked), tokens [n] int (tokens[0] is the
  root's token). A node whose token is negative
  (-1: the draft ran out of support, see sampling.gumbel_top_k) is absent: it is never tested or
  visited, so its subtree is unreachable;
- target_probs [n, V]: P at every node (already warped), the target's next-token distribution given
  the context ending at that node;
- draft_probs [n, V]: Q at every node, the warped draft distribution the node's children were drawn
  from (rows of leaves are never read and may be anything, e.g. zeros; the decoder passes a
  spec.sampling.NodeRows, which holds only the internal nodes' rows);
- generator: a CPU torch.Generator. Each call draws exactly n float64 uniforms u[0..n-1] up front:
  u[c] decides the acceptance test of child c (every non-root node is tested at most once) and u[0]
  (the root is never a child) draws the bonus token by inverse CDF. So the same generator state
  gives the same result, whatever the tree's shape.

The probability tensors may be large and live on a GPU (n = 512, V = 128k): only the rows of nodes
actually visited on the walk are read, each moved to CPU float64 when it is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..errors import ModelOutputError
from ..model.tree import Tree

__all__ = ["VerifyResult", "verify_greedy", "verify_sequoia", "verify_specinfer", "verify_topk"]

TreeLike = Tree | Sequence[int]


@dataclass(frozen=True)
class VerifyResult:
    """Accepted node indices (root excluded, top-down) and the bonus token."""

    path: list[int]
    bonus_token: int


# --- inputs


def _tree_and_tokens(tree: TreeLike, tokens: Tensor | Sequence[int]) -> tuple[Tree, list[int]]:
    if not isinstance(tree, Tree):
        try:
            tree = Tree(tree)
        except ValueError as e:  # a malformed tree here is a bug of the caller, not a user error
            raise AssertionError(f"not a valid tree: {e}") from None
    tokens = torch.as_tensor(tokens, dtype=torch.int64).cpu().tolist() if isinstance(tokens, Tensor) else list(tokens)
    assert len(tokens) == len(tree), f"tokens must be [{len(tree)}], got {len(tokens)}"
    return tree, tokens


def _check_probs(name: str, probs: Tensor, n: int, vocab: int | None = None) -> int:
    assert probs.dim() == 2 and probs.shape[0] == n, f"{name} must be [{n}, V], got {tuple(probs.shape)}"
    assert vocab is None or probs.shape[1] == vocab, (
        f"{name} must be [{n}, {vocab}], got {tuple(probs.shape)}"
    )
    return probs.shape[1]


NAN_MESSAGE = ("the {model} produced NaN logits; the checkpoint may be corrupt (re-download it; with float16, "
               "try --dtype bfloat16 or float32, whose range does not overflow)")


def nan_error(model: str = "model") -> ModelOutputError:
    return ModelOutputError(NAN_MESSAGE.format(model=model))


def _row(probs: Tensor, node: int, model: str = "model") -> Tensor:
    """Row `node` as a normalised CPU float64 distribution (the only place rows are read).

    A NaN anywhere in the logits (a corrupt checkpoint, a float16 overflow) makes the warped row NaN, so its sum,
    which is read here anyway, is where it shows: a user error, not a broken invariant.
    """
    row = probs[node].to(device="cpu", dtype=torch.float64)
    total = float(row.sum())
    if total != total:
        raise nan_error(model)
    assert total > 0 and total < float("inf"), f"row {node} is not a distribution (sum {total})"
    return row / total


# --- the walk


def _inverse_cdf(P: Tensor, u: float) -> int:
    """The token whose CDF interval holds u; never a zero-probability token."""
    cdf = torch.cumsum(P, dim=0)
    token = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype), right=True))
    if token >= P.shape[0]:  # u * total rounded up to the total: take the last token with mass
        token = int(torch.nonzero(P).max())
    return token


def _walk(
    tree: TreeLike,
    tokens: Tensor | Sequence[int],
    target_probs: Tensor,
    draft_probs: Tensor | None,
    generator: torch.Generator,
    draft: str,
) -> VerifyResult:
    """Rejection walk shared by the three sampling verifiers.

    `draft` says how the children of a node were drawn, which fixes Q for each child test:
    "without_replacement" (Q loses each rejected child), "with_replacement" (Q fixed) or
    "point_mass" (deterministic children: Q is the point mass on the child being tested).

    Why the emitted token at a node has law P, by induction on the number of children k: with
    k = 0 the bonus is drawn from P. With k > 0 the first child x has law Q and is accepted with
    probability min(1, P[x]/Q[x]), which emits min(P, Q); it is rejected with probability
    sum(max(Q - P, 0)) = sum(max(P - Q, 0)), and then the remaining k - 1 children, given x, are
    k - 1 draws from the Q the walk uses next (Q without x renormalised, Q itself, or the next point
    mass), so by induction they emit the residual norm(max(P - Q, 0)) whatever x was. In total
    min(P, Q) + max(P - Q, 0) = P. An accepted child then continues the same argument one level
    down with that child's P, so the whole emitted sequence follows the target.

    Trees whose shape depends on the draft (dynamic trees, spec/growth.py). The argument never uses a
    shape fixed in advance. Stage j at a node u (testing its j-th child x_j, after x_1..x_{j-1} were
    tested and rejected) needs only this: conditionally on what came before it (the path to u, x_1..x_{j-1}
    and the walk's uniforms so far), (a) whether u has a j-th child is already decided, and (b) if it has,
    x_j is a draw from the Q the walk holds at that point. Then, whatever the number of children turns out
    to be, the stage-by-stage induction above goes through unchanged, and one level down the same holds at
    the accepted child. For Sequoia's rule (b) means x_j has law Q without x_1..x_{j-1}: true of the j-th
    Gumbel-top-k draw whenever (a) holds and no earlier draw at u was left out of the tree. (a) fails if
    presence looks at x_j itself, or at anything that depends on it: the later draws x_{j+1}, ... (their
    law depends on x_j), or nodes drawn below any of them. A grown tree satisfies (a) and (b): each node's
    presence is decided from the keys, tokens and Q of the nodes ranked above it and its own key, which is
    known before it is drawn (keys never increase along siblings or down the tree, so those nodes are
    never x_j, its later siblings or their subtrees), and the kept tree is closed under earlier siblings.
    The target's side (P, the uniforms) never enters the shape. Two prunings that break it, each failing
    tests/test_dynamic_lossless.py: keeping a later sibling after dropping an earlier one (its law is Q
    without the dropped token, which this walk does not remove: (b) fails), and keeping a node for its own
    drawn token, e.g. its draft probability (the walk then tests a selected token, not a drawn one: (a)
    fails). The same conditions make SpecInfer's rule lossless for grown trees (x_j has law Q whatever came
    before), and the point-mass rule needs only that the tree not depend on the walk's uniforms.
    """
    tree, token_of = _tree_and_tokens(tree, tokens)
    n = len(tree)
    vocab = _check_probs("target_probs", target_probs, n)
    if draft != "point_mass":
        assert draft_probs is not None, "this verifier needs draft_probs (Q at every node)"
        _check_probs("draft_probs", draft_probs, n, vocab)
    assert token_of[0] >= 0 and max(token_of) < vocab, f"tokens must be < {vocab}, the root's >= 0"
    assert generator is not None and generator.device.type == "cpu", (
        "pass a CPU torch.Generator (the walk is on the host)"
    )

    uniforms = torch.rand(n, generator=generator, dtype=torch.float64).tolist()
    path: list[int] = []
    node = 0
    point_mass = draft == "point_mass"
    while True:
        children = tree.children[node]
        P = _row(target_probs, node)
        # Q is read only where there are children: the drafter need not fill Q at leaves.
        Q = _row(draft_probs, node, "draft model") if children and not point_mass else None
        accepted = None
        for child in children:
            x = token_of[child]
            if x < 0:  # absent node
                continue
            q_x = 1.0 if point_mass else Q[x].item()
            # A child drawn from Q has Q[x] > 0: drafts without replacement are distinct, and
            # renormalising Q after removing earlier children keeps positive entries positive.
            assert q_x > 0, f"node {child}: token {x} has zero draft probability; draw children from Q"
            if uniforms[child] < P[x].item() / q_x:  # accept with probability min(1, P[x]/Q[x])
                accepted = child
                break
            # Rejected: the rest of the walk must emit the residual norm(max(P - Q, 0)), which is
            # exactly what makes accept-or-residual reproduce P. Rejection implies P[x] < Q[x], so
            # the residual gives x no mass. With Q a point mass the residual is P without x.
            if point_mass:
                residual = P.clone()
                residual[x] = 0.0
            else:
                residual = (P - Q).clamp_min_(0.0)
            mass = float(residual.sum())
            # mass == 0 would need P <= Q everywhere, i.e. P == Q (both sum to 1), and then x is
            # accepted with probability 1: it only happens through float rounding, an O(eps)
            # event, so keeping P there changes the output distribution by O(eps) at most.
            if mass > 0:
                P = residual / mass
            if draft == "without_replacement":
                # The next child is drawn from Q without x: conditionally on the earlier draws, its
                # distribution is Q with x removed and renormalised, and that is the Q its test must
                # use (Sequoia's induction on the number of children). If Q was a point mass on x
                # nothing is left; a valid tree then has no further children here (asserted above).
                Q[x] = 0.0
                q_mass = float(Q.sum())
                if q_mass > 0:
                    Q = Q / q_mass
        if accepted is None:
            # No child accepted (or a leaf): the bonus comes from the current residual P.
            return VerifyResult(path=path, bonus_token=_inverse_cdf(P, uniforms[0]))
        path.append(accepted)
        node = accepted


def _argmax(row: Tensor) -> int:
    """The row's argmax (ties -> lowest index), read with its value in one transfer: torch's argmax ranks NaN
    above every number, so a NaN row would otherwise become a token silently."""
    value, index = torch.max(row, dim=-1)
    value, index = torch.stack((value.to(torch.float64), index.to(torch.float64))).tolist()
    if value != value:
        raise nan_error()
    return int(index)


# --- public verifiers


def verify_sequoia(
    tree: TreeLike,
    tokens: Tensor | Sequence[int],
    target_probs: Tensor,
    draft_probs: Tensor,
    generator: torch.Generator,
) -> VerifyResult:
    """Sequoia: the children of each node were drawn from Q WITHOUT replacement (Gumbel-top-k).

    For each child x in order: accept with probability min(1, P[x]/Q[x]); on rejection
    P = norm(max(P - Q, 0)), then Q[x] = 0 and Q = norm(Q).
    """
    return _walk(tree, tokens, target_probs, draft_probs, generator, draft="without_replacement")


def verify_specinfer(
    tree: TreeLike,
    tokens: Tensor | Sequence[int],
    target_probs: Tensor,
    draft_probs: Tensor,
    generator: torch.Generator,
) -> VerifyResult:
    """SpecInfer: the children were drawn from Q WITH replacement (independently).

    Like Sequoia, but Q is left unchanged after a rejection. Not lossless for children drawn
    without replacement.
    """
    return _walk(tree, tokens, target_probs, draft_probs, generator, draft="with_replacement")


def verify_topk(
    tree: TreeLike,
    tokens: Tensor | Sequence[int],
    target_probs: Tensor,
    draft_probs: Tensor | None,
    generator: torch.Generator,
) -> VerifyResult:
    """Deterministic children (the draft's top-k); draft_probs is ignored and may be None.

    Each child is treated as a point mass: accept x with probability P[x] (P renormalised), on
    rejection zero P[x] and renormalise. Lossless for any children chosen independently of the
    verifier's uniforms.
    """
    return _walk(tree, tokens, target_probs, None, generator, draft="point_mass")


def verify_greedy(
    tree: TreeLike,
    tokens: Tensor | Sequence[int],
    target_probs: Tensor,
    draft_probs: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """Temperature 0: follow the child whose token is the target's argmax; bonus = that argmax.

    target_probs is either [n, V] probabilities/logits (the argmax of a visited row only, ties ->
    lowest index) or [n] argmax tokens. draft_probs and generator are ignored. Deterministic.
    """
    tree, token_of = _tree_and_tokens(tree, tokens)
    n = len(tree)
    if target_probs.dim() == 2:
        _check_probs("target_probs", target_probs, n)
    else:
        assert target_probs.shape == (n,), f"target argmax must be [{n}], got {tuple(target_probs.shape)}"
    path: list[int] = []
    node = 0
    while True:
        row = target_probs[node]
        best = _argmax(row) if row.dim() == 1 else int(row)
        matching = [c for c in tree.children[node] if token_of[c] == best]
        if not matching:
            return VerifyResult(path=path, bonus_token=best)
        node = matching[0]
        path.append(node)
