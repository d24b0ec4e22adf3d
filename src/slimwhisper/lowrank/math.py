"""Pure functions of LiteASR-style compression: rank choice, PCA factors, low-rank attention.

A linear y = W x + b whose outputs have mean mu and covariance C = V diag(lambda) V^T is replaced
by y ~ mu + V_k V_k^T (y - mu) = V_k (V_k^T W) x + [mu + V_k V_k^T (b - mu)]: a down projection
V_k^T W [k, d_in] without bias, an up projection V_k [d_out, k] with the corrected bias.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch


def pca_basis(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors (columns) of a covariance, in float64."""
    cov = cov.double()
    values, vectors = torch.linalg.eigh((cov + cov.T) / 2)
    return values.flip(0).clamp_min(0.0), vectors.flip(1)


def energy_rank(
    eigenvalues: torch.Tensor,
    theta: float,
    granule: int,
    d_in: int,
    d_out: int,
    energy: str = "squared",
    dense_if_no_saving: bool = True,
) -> int | None:
    """The rank for one linear, or None when it should stay dense.

    k is the smallest multiple of `granule` below d_out whose energy ratio is strictly greater than
    theta; energy is the sum of singular values of the centred outputs ("linear", sqrt of the
    covariance eigenvalues) or of their squares ("squared", the eigenvalues: explained variance).
    theta >= 1 asks for every component (k = d_out). When no multiple passes the layer stays dense
    (LiteASR fell through to d_out - 1 components here, a factorisation larger than the layer), and
    when k (d_in + d_out) >= d_in d_out the factorisation would not save compute, so it stays dense.
    """
    values = eigenvalues.double().clamp_min(0.0)
    weights = values.sqrt() if energy == "linear" else values
    total = float(weights.sum())
    if theta >= 1.0:
        k: int | None = d_out
    elif total <= 0.0:  # constant outputs: any rank reproduces them through the bias
        k = granule
    else:
        cumulative = torch.cumsum(weights, 0) / total
        k = None
        for j in range(granule, d_out, granule):
            if float(cumulative[min(j, len(cumulative)) - 1]) > theta:
                k = j
                break
    if k is None:
        return None
    if dense_if_no_saving and k > largest_saving_rank(d_in, d_out):
        return None
    return k


def fixed_rank(rank: int, d_in: int, d_out: int, dense_if_no_saving: bool = True) -> int | None:
    """A fixed rank capped at d_out, or None when it would not save compute."""
    k = min(rank, d_out)
    if dense_if_no_saving and k > largest_saving_rank(d_in, d_out):
        return None
    return k


def largest_saving_rank(d_in: int, d_out: int) -> int:
    """The largest rank k whose pair costs fewer multiplies than the dense linear: k·(in+out) < in·out."""
    return (d_in * d_out - 1) // (d_in + d_out)


def pca_factors(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    cov: torch.Tensor,
    k: int,
    basis: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first [k, d_in], second [d_out, k], bias' [d_out]) in float64; see the module docstring."""
    _, vectors = basis if basis is not None else pca_basis(cov)
    v = vectors[:, :k].double()
    w = weight.double()
    mu = mean.double()
    b = bias.double() if bias is not None else torch.zeros_like(mu)
    first = v.T @ w
    new_bias = mu + v @ (v.T @ (b - mu))
    return first, v.clone(), new_bias


def attention_flops(length: int, heads: int, head_dim: int, k_q: int, k_k: int, k_v: int) -> dict[str, int]:
    """Multiply-adds x2 per sequence for the score and value parts of one attention, both ways.

    "scores_full": up-project q and k, then L^2 d; "scores_reduced" (paper Eq. 12): fold the two up
    projections into one [k_q, k_k] matrix per head, then scores in min(k_q, k_k) (+1 for the bias)
    dims. "values_full": up-project v, then L^2 d; "values_reduced" (Eq. 16): weight the rank-k_v
    values, then up-project each head's output.
    """
    d = heads * head_dim
    r = min(k_q, k_k) + (1 if k_k > k_q else 0)
    return {
        "scores_full": 2 * length * d * (k_q + k_k) + 2 * length * length * d,
        "scores_reduced": 2 * heads * length * k_q * k_k + 2 * heads * length * length * r,
        "values_full": 2 * length * d * k_v + 2 * length * length * d,
        "values_reduced": 2 * heads * length * length * k_v + 2 * length * k_v * d,
    }


def choose_attention_path(
    length: int, heads: int, head_dim: int, k_q: int | None, k_k: int | None, k_v: int | None
) -> tuple[bool, bool]:
    """(reduce scores, reduce values) by FLOP count; a dense projection (rank None) is never reduced."""
    d = heads * head_dim
    flops = attention_flops(length, heads, head_dim, k_q or d, k_k or d, k_v or d)
    scores = k_q is not None and k_k is not None and flops["scores_reduced"] < flops["scores_full"]
    values = k_v is not None and flops["values_reduced"] < flops["values_full"]
    return scores, values


def keep_fused_kernel(
    plan: tuple[bool, bool], head_dim: int, k_q: int | None, k_k: int | None, k_v: int | None
) -> tuple[bool, bool]:
    """The largest part of `plan` (reduce scores, reduce values) whose q, k and v share one head dim.

    Fused attention kernels (PyTorch's flash kernel on CPU) need one head dim for q, k and v; with
    mixed dims SDPA falls back to materialising the [L, L] scores, which on 1500 frames costs more
    than the rank space saves.
    """

    def same_dims(scores: bool, values: bool) -> bool:
        qk_dim = (k_k if k_k <= k_q else k_q + 1) if scores else head_dim  # see `reduced_scores_operands`
        return qk_dim == (k_v if values else head_dim)

    candidates = (plan, (plan[0], False), (False, plan[1]), (False, False))
    return next(c for c in candidates if same_dims(*c))


def reduced_scores_operands(
    q_low: torch.Tensor,
    k_low: torch.Tensor,
    q_up: torch.Tensor,
    q_bias: torch.Tensor,
    k_up: torch.Tensor,
    k_bias: torch.Tensor,
    heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head query and key operands [B, H, L, r] whose dot products equal the scores up to row constants.

    q_low [B, L, k_q] and k_low [B, L, k_k] are the down-projected inputs; q_up [d, k_q], k_up [d, k_k]
    and the biases [d] are the up projections. Q_j K_j^T = Q' M_j K'^T + 1 (B_k,j^T b_q,j)^T K'^T
    + (terms constant along keys, cancelled by the softmax), with M_j = B_q,j^T B_k,j (paper Eq. 12).
    """
    batch, length, k_q = q_low.shape
    k_k = k_low.shape[-1]
    head_dim = q_up.shape[0] // heads
    bq = q_up.view(heads, head_dim, k_q)
    bk = k_up.view(heads, head_dim, k_k)
    mixed = bq.transpose(1, 2) @ bk  # [H, k_q, k_k]
    key_bias = torch.einsum("hd,hdk->hk", q_bias.view(heads, head_dim), bk)  # [H, k_k]
    if k_k <= k_q:  # work in the key's rank space
        query = torch.einsum("blq,hqk->bhlk", q_low, mixed) + key_bias[None, :, None, :]
        key = k_low.unsqueeze(1).expand(batch, heads, length, k_k)
        return query, key
    # work in the query's rank space; the key-dependent bias term rides on an extra constant dim
    key = torch.einsum("blk,hqk->bhlq", k_low, mixed)
    extra = torch.einsum("blk,hk->bhl", k_low, key_bias).unsqueeze(-1)
    key = torch.cat([key, extra], dim=-1)
    ones = q_low.new_ones(batch, length, 1)
    query = torch.cat([q_low, ones], dim=-1).unsqueeze(1).expand(batch, heads, length, k_q + 1)
    return query, key


def rank_options(d_in: int, d_out: int, granule: int) -> list[int]:
    """Ranks worth considering for one linear: multiples of `granule` whose factor pair is cheaper than dense."""
    return [k for k in range(granule, d_out, granule) if k * (d_in + d_out) < d_in * d_out]


def lost_energy(eigenvalues: torch.Tensor, k: int) -> float:
    """Output variance a rank-k PCA leaves out: the sum of the eigenvalues past the k-th."""
    return float(eigenvalues.double().clamp_min(0.0)[k:].sum())


def budget_ranks(
    spectra: dict[str, tuple[torch.Tensor, int, int]],
    budget: float,
    granule: int,
    errors: dict[str, dict[int, float]] | None = None,
) -> dict[str, int | None]:
    """Ranks (None = dense) that keep at most `budget` of the linears' FLOPs at the least predicted loss.

    `spectra` maps a linear's name to (output eigenvalues, d_in, d_out). A linear costs d_in d_out per
    row dense and k (d_in + d_out) at rank k. Its loss at rank k is `errors[name]` (the encoder output's
    error measured with that linear alone at a few ranks, `calibrate.probe_errors`) interpolated by
    `predicted_error`; without `errors`, the share of the linear's own output energy it loses. Errors of
    different linears are taken to add. Starting dense, every step lowers by one granule the rank of the
    linear whose step adds the least loss per FLOP saved.
    """
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    options = {n: [None, *reversed(rank_options(d_in, d_out, granule))] for n, (_, d_in, d_out) in spectra.items()}

    def cost(name: str, k: int | None) -> int:
        _, d_in, d_out = spectra[name]
        return d_in * d_out if k is None else k * (d_in + d_out)

    def loss(name: str, k: int | None) -> float:
        values = spectra[name][0]
        if k is None:
            return 0.0
        if errors is None:
            return lost_energy(values, k) / max(lost_energy(values, 0), 1e-30)
        return predicted_error(values, errors[name], k)

    # every option's cost and loss once: the loop below revisits each linear at every step
    costs = {n: [cost(n, k) for k in ks] for n, ks in options.items()}
    losses = {n: [loss(n, k) for k in ks] for n, ks in options.items()}
    position = dict.fromkeys(spectra, 0)
    total = sum(c[0] for c in costs.values())
    used = total
    while used > budget * total:
        best, best_ratio = None, float("inf")
        for name, i in position.items():
            if i + 1 >= len(options[name]):
                continue
            ratio = (losses[name][i + 1] - losses[name][i]) / (costs[name][i] - costs[name][i + 1])
            if ratio < best_ratio:
                best, best_ratio = name, ratio
        if best is None:  # every linear is at its smallest rank: the budget cannot be met
            break
        i = position[best]
        used -= costs[best][i] - costs[best][i + 1]
        position[best] = i + 1
    return {n: options[n][i] for n, i in position.items()}


def uniform_budget_ranks(shapes: dict[str, tuple[int, int]], budget: float, granule: int) -> dict[str, int | None]:
    """One rank for every linear (None = dense where that rank saves nothing): the largest multiple of
    `granule` whose total FLOPs stay within `budget` of the dense linears' (the smallest when none does)."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    top = max(d_out for _, d_out in shapes.values())
    ranks: dict[str, int | None] = {}
    for rank in range(top - top % granule, 0, -granule):
        ranks = {n: rank if rank * (d_in + d_out) < d_in * d_out else None for n, (d_in, d_out) in shapes.items()}
        if flops_kept(ranks, shapes) <= budget:
            break
    return ranks


def role_options(shapes: Sequence[tuple[int, int]], granule: int) -> list[int | None]:
    """The ranks a role (linears sharing one rank) can take, ascending, then None (dense): the multiples of
    `granule` that save FLOPs on at least one of its linears."""
    return sorted({k for d_in, d_out in shapes for k in rank_options(d_in, d_out, granule)}) + [None]


def role_costs(shapes: Sequence[tuple[int, int]], options: Sequence[int | None]) -> list[int]:
    """Per-row cost of a role at each of its `options` (a linear where a rank saves nothing stays dense at that
    rank, as in `uniform_budget_ranks`)."""
    return [sum(i * o if k is None else min(k * (i + o), i * o) for i, o in shapes) for k in options]


def fitting_combinations(costs: dict[str, list[int]], limit: float,
                         allowed: dict[str, list[int]]) -> list[dict[str, int]]:
    """Combinations of option positions (one per role, from `allowed`) whose total cost fits `limit` and that
    cannot raise any role to its next allowed option without breaking it: the most each can keep."""
    roles = list(costs)
    found = []
    for picks in itertools.product(*(allowed[r] for r in roles)):
        total = sum(costs[r][p] for r, p in zip(roles, picks))
        if total > limit:
            continue
        if all(not (higher := [q for q in allowed[r] if q > p]) or total - costs[r][p] + costs[r][higher[0]] > limit
               for r, p in zip(roles, picks)):
            found.append(dict(zip(roles, picks)))
    return found


def search_roles(costs: dict[str, list[int]], limit: float,
                 evaluate: Callable[[dict[str, int]], float], widest: int = 8) -> dict[str, int]:
    """Option positions per role that fit `limit` at the least `evaluate`d error, searched coarse to fine.

    Positions index each role's `role_options` (the last is dense), `costs` their `role_costs`. The first pass
    tries the combinations on a grid of every `stride`-th position (the smallest power of two leaving at most
    `widest` per role; ranks every `stride` granules, as the options are consecutive multiples of the
    granule), each later pass halves the stride around the best combination so far, down to one position, and
    passes at one position go on around each new best until it stays. Every combination tried fits and is
    maximal on its grid; none is evaluated twice."""
    stride = 1
    while max(len(c) for c in costs.values()) / stride > widest:
        stride *= 2
    seen: dict[tuple[tuple[str, int], ...], float] = {}
    best: dict[str, int] | None = None
    window = 0
    while True:
        allowed = {r: [p for p in range(len(c)) if (p + 1) % stride == 0 or p == len(c) - 1]
                   for r, c in costs.items()}
        if best is not None:
            allowed = {r: [p for p in ps if abs(p - best[r]) <= window] for r, ps in allowed.items()}
        combos = fitting_combinations(costs, limit, allowed)
        if best is None and not combos:  # nothing fits: every role at its smallest rank
            return dict.fromkeys(costs, 0)
        for combo in combos:
            key = tuple(combo.items())
            if key not in seen:
                seen[key] = evaluate(combo)
        previous, best = best, dict(min(seen, key=seen.__getitem__))
        if stride == 1 and best == previous:
            return best
        if stride > 1:
            window, stride = stride, stride // 2


def probe_ranks(d_in: int, d_out: int, granule: int, count: int = 5) -> list[int]:
    """Up to `count` ranks spread evenly over a linear's options (smallest and largest included), where its
    error is measured; empty when no rank saves FLOPs."""
    choices = rank_options(d_in, d_out, granule)
    if len(choices) <= count:
        return choices
    return sorted({choices[round(i * (len(choices) - 1) / (count - 1))] for i in range(count)})


def predicted_error(eigenvalues: torch.Tensor, measured: dict[int, float], k: int) -> float:
    """The error at rank k from errors measured at a few ranks: linear in lost energy between the two nearest
    measured ranks (0 error at full rank), so the curve bends as the spectrum does and meets every measure."""
    points = sorted(measured.items())  # ascending rank: descending lost energy
    points.append((len(eigenvalues), 0.0))
    if k <= points[0][0]:
        return points[0][1]
    for (k_lo, e_lo), (k_hi, e_hi) in zip(points, points[1:]):
        if k <= k_hi:
            l_lo, l_hi, l_k = (lost_energy(eigenvalues, r) for r in (k_lo, k_hi, k))
            share = (l_lo - l_k) / (l_lo - l_hi) if l_lo > l_hi else 1.0
            return e_lo + share * (e_hi - e_lo)
    return 0.0


def flops_kept(ranks: dict[str, int | None], shapes: dict[str, tuple[int, int]]) -> float:
    """Share of the dense linears' FLOPs that `ranks` (None = dense) keep."""
    dense = sum(d_in * d_out for d_in, d_out in shapes.values())
    kept = sum(d_in * d_out if ranks.get(n) is None else ranks[n] * (d_in + d_out)
               for n, (d_in, d_out) in shapes.items())
    return kept / dense


# Narrow heads: each encoder attention head keeps `dim` < head_dim dimensions for its scores and its values.
# The score of query q and key k in one head is q·k. For any invertible A, (A q)·(A^-T k) is the same score,
# so the pair can be rotated and scaled freely; with the heads' second moments M_q = E[q q^T] and M_k
# = E[k k^T] on calibration audio, the whitened form q^ = M_q^-1/2 q, k^ = M_k^-1/2 k gives q·k = q^T G k^ with
# G = M_q^1/2 M_k^1/2, and the rank-`dim` SVD of G keeps E[(q·k)^2] closest (queries and keys taken as
# independent). Values pass through the softmax (rows summing to 1) into the output projection W_o's
# columns of that head, so a head's output W_o v is kept best by the rank-`dim` SVD of W_o M_v^1/2.


def root_pair(moment: torch.Tensor, floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(M^1/2, M^-1/2) of a symmetric second moment, its eigenvalues floored at `floor` x the largest (a
    direction the data never takes would otherwise blow up the inverse)."""
    values, vectors = torch.linalg.eigh(moment.double())
    values = values.clamp_min(values.max().clamp_min(1e-300) * floor)
    return (vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T


def score_maps(moment_q: torch.Tensor, moment_k: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_q, A_k), each [dim, head_dim]: one head's narrowed query A_q q and key A_k k, whose dot product
    keeps q·k closest on data with these second moments (exact at dim = head_dim)."""
    root_q, inv_q = root_pair(moment_q)
    root_k, inv_k = root_pair(moment_k)
    u, s, vh = torch.linalg.svd(root_q @ root_k)
    scale = s[:dim].sqrt()[:, None]
    return scale * (u[:, :dim].T @ inv_q), scale * (vh[:dim] @ inv_k)


def value_maps(w_out: torch.Tensor, moment_v: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_v [dim, head_dim], B_o [d_out, dim]): one head's narrowed value A_v v and the output projection's
    columns B_o for it, so that B_o A_v v keeps W_o v closest on data with this second moment."""
    root, inv = root_pair(moment_v)
    _, _, vh = torch.linalg.svd(w_out.double() @ root)  # all head_dim rows: W_o may have fewer
    return vh[:dim] @ inv, w_out.double() @ root @ vh[:dim].T


def head_dim_options(head_dim: int, granule: int) -> list[int]:
    """Narrowed head dims, widest first: multiples of `granule` below `head_dim`, down to half of it. Narrower
    heads were measured to cost far more words than the encoder-output error of a few windows predicts, for
    little time (docs/lowrank.md, "Narrow heads")."""
    if head_dim % granule:
        return []
    return list(range(head_dim - granule, head_dim // 2 - 1, -granule))


def greedy_head_dims(errors: dict[int, dict[int, float]], head_dim: int, budget: float) -> dict[int, int]:
    """layer -> head dim keeping at most `budget` of the layers' summed head dims (scores and values cost
    L^2 x head dim), narrowing step by step where the measured error (layer -> {dim: error with that layer
    alone narrowed}) grows least per dimension given up. Layers not narrowed are left out."""
    dims = {layer: head_dim for layer in errors}
    limit = budget * head_dim * len(errors)

    def step(layer: int) -> tuple[float, int] | None:
        narrower = [d for d in sorted(errors[layer], reverse=True) if d < dims[layer]]
        if not narrower:
            return None
        d = narrower[0]
        before = errors[layer].get(dims[layer], 0.0)
        return (errors[layer][d] - before) / (dims[layer] - d), d

    while sum(dims.values()) > limit:
        steps = {layer: s for layer in dims if (s := step(layer)) is not None}
        if not steps:
            break
        layer = min(steps, key=lambda n: (steps[n][0], n))
        dims[layer] = steps[layer][1]
    return {layer: d for layer, d in dims.items() if d < head_dim}
