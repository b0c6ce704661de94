"""Single-level periodic discrete wavelet transform along the last axis, in torch (autograd,
any device), with the filter taps of an orthogonal PyWavelets wavelet.

`analysis` is PyWavelets' `dwt(x, wavelet, mode="periodization")` at even length n: the low-
and high-pass coefficients (L x, H x), L and H the n/2 × n analysis matrices. `synthesis`
is its exact adjoint Lᵀ c_lo + Hᵀ c_hi. Periodization makes [L; H] orthogonal at even
length for an orthogonal wavelet, so the adjoint is also the inverse (perfect reconstruction).
Odd lengths are padded to even first (`pad_to_even`), which keeps the map linear but not
orthogonal.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fedllm.registry import RecipeError

ODD_PADDING = ("zero", "edge")


def wavelet_filters(name: str) -> torch.Tensor:
    """(2, 1, taps) fp32: the low- and high-pass decomposition filters, reversed, because
    conv1d correlates where the DWT convolves."""
    try:
        import pywt  # only WaRA needs it: an optional dependency
    except ImportError:
        raise RecipeError("adapter 'wara' needs PyWavelets for the filter taps: pip install PyWavelets") from None
    try:
        wavelet = pywt.Wavelet(name)
    except ValueError:
        raise RecipeError(
            f"adapter.wavelet: '{name}' is not a discrete PyWavelets wavelet; orthogonal ones are "
            "haar, dbN, symN, coifN, dmey (pywt.wavelist(kind='discrete'))"
        ) from None
    if not wavelet.orthogonal:
        raise RecipeError(f"adapter.wavelet: '{name}' is not orthogonal; WaRA needs an orthogonal wavelet (haar, dbN, symN, coifN)")
    taps = torch.tensor([wavelet.dec_lo[::-1], wavelet.dec_hi[::-1]], dtype=torch.float64).unsqueeze(1)
    # 'dmey' claims orthogonality but is an FIR approximation (reconstruction error ~1e-2):
    # the exactness WaRA's merge and export rely on is checked, not assumed
    eye = torch.eye(2 * taps.shape[-1], dtype=torch.float64)
    if not torch.allclose(synthesis(analysis(eye, taps), taps), eye, atol=1e-6):
        raise RecipeError(f"adapter.wavelet: '{name}' does not reconstruct perfectly (an approximate wavelet); use haar, dbN, symN or coifN")
    return taps.float()


def _wrap_index(n: int, taps: int, device) -> torch.Tensor:
    # the periodic extension by taps - 2 samples; PyWavelets' periodization starts each
    # filter window taps/2 - 1 samples to the left of 2k
    shift = taps // 2 - 1
    return torch.arange(-shift, n + taps - 2 - shift, device=device) % n


def analysis(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (..., 2, n/2): the low-pass, then the high-pass coefficients (n even)."""
    *lead, n = x.shape
    flat = x.reshape(-1, 1, n)
    if filters.shape[-1] > 2:  # Haar's windows never wrap: skip the copy
        flat = flat.index_select(-1, _wrap_index(n, filters.shape[-1], x.device))
    return F.conv1d(flat, filters, stride=2).reshape(*lead, 2, n // 2)


def synthesis(c: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """(..., 2, m) -> (..., 2m): the adjoint of `analysis`, i.e. its inverse."""
    *lead, _, m = c.shape
    out = F.conv_transpose1d(c.reshape(-1, 2, m), filters, stride=2)[:, 0]  # (N, 2m + taps - 2)
    if filters.shape[-1] > 2:
        # fold the periodic extension back onto the samples it copied (adjoint of the gather)
        out = out.new_zeros(out.shape[0], 2 * m).index_add(1, _wrap_index(2 * m, filters.shape[-1], c.device), out)
    return out.reshape(*lead, 2 * m)


def pad_to_even(x: torch.Tensor, rule: str) -> torch.Tensor:
    """Odd length d -> d + 1: append a zero (`zero`) or repeat the last sample (`edge`, what
    PyWavelets' periodization does for odd lengths)."""
    if x.shape[-1] % 2 == 0:
        return x
    extra = x[..., -1:] if rule == "edge" else torch.zeros_like(x[..., -1:])
    return torch.cat([x, extra], -1)


def pad_adjoint(y: torch.Tensor, d: int, rule: str) -> torch.Tensor:
    """The adjoint of `pad_to_even` back to length d: `edge` folds the copy onto the last sample."""
    if y.shape[-1] == d:
        return y
    if rule == "edge":
        return torch.cat([y[..., : d - 1], y[..., d - 1 : d] + y[..., d:]], -1)
    return y[..., :d]
