"""Factored SVD of sums of low-rank products, batched over layers of the same shape.

ΔW = P @ Q with P (out × R) and Q (R × in). When R < min(out, in) the out × in matrix is never
formed: QR(P) = Qp Rp, QR(Qᵀ) = Qq Rq, SVD(Rp Rqᵀ) = U Σ Vᵀ, so ΔW = (Qp U) Σ (Qq V)ᵀ.

The arithmetic is written once against the array API standard (array-api-compat) and runs on
torch where it is installed (MKL on CPU, CUDA when present), numpy otherwise: MKL's symmetric
eigensolver is about twice OpenBLAS's on the 384² Gram matrices that dominate a 100-client round.
Set FEDPEFT_MERGE_BACKEND=numpy to keep torch out of the aggregator.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device, to_device

from aggregator.strategies.base import SvdFactors

BACKEND_ENV = "FEDPEFT_MERGE_BACKEND"


@dataclass(frozen=True)
class Backend:
    """An array namespace of the array API standard and the device the merge arithmetic runs on."""

    name: str
    xp: ModuleType
    device: Any

    def asarray(self, x: np.ndarray) -> Any:
        return self.xp.asarray(x, device=self.device)

    def numpy(self, x: Any) -> np.ndarray:
        return np.asarray(to_device(x, "cpu"))


def numpy_backend() -> Backend:
    """numpy with the BLAS/LAPACK it was built with (OpenBLAS for PyPI wheels)."""
    return Backend("numpy", array_namespace(np.empty(0)), "cpu")


def torch_backend() -> Backend:
    """torch on its CUDA device when one is usable, else on CPU (MKL); ImportError without torch."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Backend(f"torch-{device.type}", array_namespace(torch.empty(0)), device)


@functools.cache
def default_backend() -> Backend:
    """torch when importable, else numpy; FEDPEFT_MERGE_BACKEND=numpy|torch forces one."""
    choice = os.environ.get(BACKEND_ENV, "auto")
    if choice not in ("auto", "numpy", "torch"):
        raise ValueError(f"{BACKEND_ENV}={choice!r}: use auto, numpy or torch.")
    if choice == "numpy":
        return numpy_backend()
    try:
        return torch_backend()
    except ImportError:
        if choice == "torch":
            raise ImportError(f"{BACKEND_ENV}=torch but torch is not installed: pip install torch.") from None
        return numpy_backend()


def svd_of_product(
    p: np.ndarray, q: np.ndarray, keep: int | None = None, backend: Backend | None = None
) -> list[SvdFactors]:
    """SVD of p[l] @ q[l] for a batch of layers l; p (L, out, R), q (L, R, in); top `keep` kept."""
    be = backend or default_backend()
    xp, p, q = be.xp, be.asarray(p), be.asarray(q)
    out, rank, inn = p.shape[1], p.shape[2], q.shape[2]
    if rank < min(out, inn):
        qp, rp = xp.linalg.qr(p)
        qq, rq = xp.linalg.qr(xp.matrix_transpose(q))
        u, s, vt = xp.linalg.svd(rp @ xp.matrix_transpose(rq), full_matrices=False)
        u, v = qp @ u, qq @ xp.matrix_transpose(vt)
    else:
        u, s, v = svd_by_gram(p @ q, xp)
    k = s.shape[1] if keep is None else min(keep, s.shape[1])
    u, s, v = be.numpy(u[:, :, :k]), be.numpy(s[:, :k]), be.numpy(v[:, :, :k])
    return [SvdFactors(u[i], s[i], v[i]) for i in range(u.shape[0])]


def svd_by_gram(m: Any, xp: ModuleType) -> tuple[Any, Any, Any]:
    """Thin SVD of a batch m (L, out, in) from the symmetric eigenproblem of its smaller Gram matrix.

    About 2× faster than LAPACK's SVD at 384². The Gram matrix is negated so that eigh's ascending
    order is already the descending one. Singular values are taken as ‖mᵀuᵢ‖ rather than √λᵢ,
    which keeps small ones accurate; U Σ Vᵀ reproduces m exactly up to rounding because
    Σᵢ uᵢ(mᵀuᵢ)ᵀ = U Uᵀ m. Those norms can leave eigh's order where singular values meet at
    rounding level, always near the tail, so only the columns from the first moved one are
    reordered.
    """
    flip = m.shape[1] > m.shape[2]
    if flip:
        m = xp.matrix_transpose(m)
    _, u = xp.linalg.eigh(-(m @ xp.matrix_transpose(m)))
    vs = xp.matrix_transpose(m) @ u
    s = xp.linalg.vector_norm(vs, axis=1)
    order = xp.argsort(s, axis=1, descending=True, stable=True)
    moved = xp.any(order != xp.arange(s.shape[1], device=device(order))[None, :], axis=0)
    if bool(xp.any(moved)):
        lo = int(xp.argmax(xp.astype(moved, xp.int8)))
        tail = order[:, lo:] - lo
        s[:, lo:] = xp.take_along_axis(s[:, lo:], tail, axis=1)
        u[:, :, lo:] = xp.take_along_axis(u[:, :, lo:], tail[:, None, :], axis=2)
        vs[:, :, lo:] = xp.take_along_axis(vs[:, :, lo:], tail[:, None, :], axis=2)
    v = vs / xp.where(s > 0, s, xp.ones_like(s))[:, None, :]
    return (v, s, u) if flip else (u, s, v)


def product_norms(scale: float, b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """‖scale · b[…] @ a[…]‖_F over any leading batch axes: b (…, out, r), a (…, r, in).

    ‖BA‖²_F = ⟨BᵀB, AAᵀ⟩: two r × r Gram matrices instead of a QR or the out × in product, their
    inner product summed in float64. numpy on every backend: its stacked matmul of many tiny
    matrices is several times faster than torch's.
    """
    gram_b = (np.swapaxes(b, -1, -2) @ b).astype(np.float64)
    gram_a = (a @ np.swapaxes(a, -1, -2)).astype(np.float64)
    return abs(scale) * np.sqrt(np.maximum(np.sum(gram_b * gram_a, axis=(-2, -1)), 0.0))


def redistribute(factors: SvdFactors, rank: int, scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-`rank` LoRA pair (A, B) with scaling · B @ A = top-`rank` truncation (Eckart–Young)."""
    k = min(rank, factors.s.shape[0])
    root = np.sqrt(factors.s[:k] / scaling)
    b = np.zeros((factors.u.shape[0], rank), dtype=factors.u.dtype)
    a = np.zeros((rank, factors.v.shape[0]), dtype=factors.v.dtype)
    b[:, :k] = factors.u[:, :k] * root
    a[:k] = root[:, None] * factors.v[:, :k].T
    return a, b
