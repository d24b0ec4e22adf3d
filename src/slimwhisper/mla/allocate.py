"""Latent widths per module under one cache budget: spend the bytes where they remove the most error.

Pure functions: spectra, byte prices and a budget in, widths out. A module's joint factorisation
leaves a relative error of sum_{i>r} sigma_i^2 / sum_i sigma_i^2 at width r (`tail_error`), which a
weight per module (its measured output sensitivity, `convert.weighted_spectra`) scales; the greedy
rule grows, granule by granule, the module whose next granule removes the most weighted error per
cached byte (`greedy_widths`).
"""
from __future__ import annotations

import heapq

import torch

from ..errors import SlimWhisperError


def tail_error(sigma: torch.Tensor) -> torch.Tensor:
    """err[r] = sum_{i>=r} sigma_i^2 / sum_i sigma_i^2 for r = 0..n: the relative error left at width r.

    Relative to the module's own energy (E||[k; v]||^2 on calibration audio) because modules read
    inputs of very different scales (the encoder output feeding cross attention against the decoder
    residual stream), and attention's softmax and the output projection see each module's error
    against its own signal: an absolute error would hand the whole budget to the loudest module.
    """
    energy = sigma.double().pow(2)
    total = energy.sum().clamp_min(torch.finfo(torch.float64).tiny)
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    return tail / total


def greedy_widths(
    spectra: dict[str, torch.Tensor],
    unit_bytes: dict[str, int],
    budget: int,
    granule: int,
    minimum: dict[str, int] | None = None,
    weights: dict[str, float] | None = None,
) -> dict[str, int]:
    """Widths (multiples of `granule`, at most each spectrum's length) whose cache bytes fit `budget`.

    Every module starts at its `minimum` (default one granule), so none is dropped; then the granule
    with the largest drop of weighted relative error per byte is taken, until no further granule fits. A
    spectrum does not increase, so each module's gains per granule fall and the heap order is the
    sorted order of all granule gains: the optimum of this separable problem up to the last granule
    (the knapsack's integrality). A granule that no longer fits is dropped, and cheaper modules still
    fill the rest, so afterwards adding one granule to any module not at full width would overrun.

    Args:
        spectra: module -> singular values of its weighted [W_kc; W_v] (`kv_spectrum`).
        unit_bytes: module -> cache bytes of one latent unit (cached positions x bytes per number).
        budget: cache bytes available to the latents of all modules together.
        weights: module -> how much a unit of its relative error costs (default 1 for all).
    """
    minimum = minimum or {}
    widths = {n: min(minimum.get(n, granule), len(s)) for n, s in spectra.items()}
    spent = sum(widths[n] * unit_bytes[n] for n in spectra)
    if spent > budget:
        raise SlimWhisperError(
            f"the cache budget ({budget} bytes) is below the smallest latents ({spent} bytes); lower --kv-reduction"
        )
    errors = {n: tail_error(s) * (1.0 if weights is None else weights[n]) for n, s in spectra.items()}
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        width, full = widths[name], len(spectra[name])
        if width < full:
            step = min(granule, full - width)
            gain = float(errors[name][width] - errors[name][width + step])
            heapq.heappush(heap, (-gain / (step * unit_bytes[name]), name))

    for name in spectra:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        step = min(granule, len(spectra[name]) - widths[name])
        if spent + step * unit_bytes[name] > budget:
            continue  # its later granules cost as much, so this module is done
        widths[name] += step
        spent += step * unit_bytes[name]
        push(name)
    return widths


def total_error(
    spectra: dict[str, torch.Tensor], widths: dict[str, int], weights: dict[str, float] | None = None
) -> float:
    """Weighted sum over modules of the relative error each width leaves: the objective `greedy_widths` lowers."""
    return sum(float(tail_error(spectra[n])[widths[n]]) * (1.0 if weights is None else weights[n]) for n in spectra)
