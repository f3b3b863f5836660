"""The server's own global adapter and its optimizer (FedOpt: Reddi et al., arXiv 2003.00295).

With a server optimizer the aggregator holds the global adapter itself and steps it with the
round's pseudo-gradient: the weighted sum of what each client changed, δ_i = s_i B_i A_i − what it
was sent. A low tier then never re-injects its truncation error (the merge without server state
replaces the global by Σ w_i s_i B_i A_i, and every term carries T_{r_i}(ΔW_g)).

Two forms, as the strategy declares:
- "exact" (svd-weighted, flexlora): ΔW_g per layer, dense (out × in; 1.8M values for MiniLM's
  query/value). Tier r gets its best rank-r approximation as B = U_r Σ_r / s_r, A = V_rᵀ: A's rows
  are unit vectors, so no received direction is a dead saddle (a symmetric √Σ split gives a
  near-zero direction near-zero A and B, and neither gets a gradient); directions ΔW_g does not
  have yet are filled from the bundle's initial A, orthogonalized, with B = 0, as LoRA starts.
- "factors" (fedavg-naive, hetlora, ffa-lora): A_g (R × in) and B_g (out × R) at the top tier R;
  tier r gets the first r rows of A_g and columns of B_g.
The head, when shared, is one more tensor. Everything is float32 on disk and in memory, the step
runs in float64, so a resumed aggregator continues bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from safetensors.numpy import load, load_file, save

from aggregator.strategies.base import LayerSpec, OptimizerName, SvdFactors
from aggregator.strategies.linalg import default_backend, svd_by_gram, svd_of_product
from edge_sdk.protocol import Adapter, Manifest
from edge_sdk.protocol.adapter import adapter_from_parameters

StateForm = Literal["exact", "factors"]
Schedule = Literal["constant", "cosine"]
HEAD = "head::"
KEPT_COMPONENTS = 64
"""Singular triplets of a dense ΔW_g kept with each round (tiers use at most the top tier's rank)."""


@dataclass(frozen=True)
class ServerOptimizer:
    """The server's step on the pseudo-gradient g (per tensor entry).

    sgd: m ← β1·m + g, θ ← θ + lr·m (β1 = 0: FedAvg with a server learning rate; > 0: FedAvgM).
    adam / yogi / adafactor: first and second moments with bias correction, θ ← θ + lr·m̂ / (√v̂ + eps);
    yogi moves v by sign(g² − v) (Zaheer et al. 2018); adafactor factors a matrix's v into row and
    column means (Shazeer & Stern 2018), which keeps the step's rank that of m. `head_lr` steps the
    head (default `lr`). `schedule` "cosine" anneals both learning rates from their value at step 1
    to `lr_floor` × it at step `horizon` (the federation's rounds) and holds them there, so the
    global settles instead of moving with each round's sample of devices.
    """

    name: OptimizerName = "adam"
    lr: float = 1e-3
    head_lr: float | None = None
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-5
    schedule: Schedule = "constant"
    horizon: int | None = None
    lr_floor: float = 0.0

    def __post_init__(self) -> None:
        values = (self.lr, self.head_lr if self.head_lr is not None else self.lr, self.beta1, self.beta2, self.eps)
        if not all(math.isfinite(v) for v in values) or min(self.lr, values[1], self.eps) <= 0:
            raise ValueError("The server optimizer needs finite, positive lr, head_lr and eps.")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("The server optimizer's beta1 and beta2 must lie in [0, 1).")
        if self.schedule == "cosine" and (self.horizon is None or self.horizon < 1):
            raise ValueError("A cosine server schedule needs its horizon: the number of rounds, at least 1.")
        if not 0 <= self.lr_floor <= 1:
            raise ValueError("The server schedule's lr_floor is a fraction of the lr, in [0, 1].")

    def lr_factor(self, t: int) -> float:
        """What the schedule multiplies the learning rates by at server step `t` (1-based)."""
        if self.schedule == "constant" or self.horizon == 1:
            return 1.0
        progress = min(t - 1, self.horizon - 1) / (self.horizon - 1)
        return self.lr_floor + (1 - self.lr_floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class ServerState:
    """The global adapter (`params`: "<layer>::W", or "<layer>::A"/"::B", and "head::<name>") and the
    optimizer's moments (`moments`: "m::<key>", "v::<key>"; with a closed-form head also the pooled
    feature statistics "stats::gram", "stats::sums", "stats::counts"; with dp-fedavg its noise key and
    privacy ledger, "dp::key" and "dp::ledger"; with prior calibration the pooled class totals
    "calibration::counts" and "calibration::predicted") after `step` server steps."""

    form: StateForm
    step: int
    params: dict[str, np.ndarray]
    moments: dict[str, np.ndarray]

    def to_bytes(self) -> bytes:
        tensors = {f"param::{k}": v for k, v in self.params.items()} | self.moments
        return save({**tensors, "step": np.array([self.step], dtype=np.int64)})

    @classmethod
    def from_bytes(cls, data: bytes, form: StateForm) -> ServerState:
        tensors = load(data)
        params = {k[len("param::"):]: v for k, v in tensors.items() if k.startswith("param::")}
        moments = {k: v for k, v in tensors.items() if k.startswith(("m::", "v::", "stats::", "dp::", "calibration::"))}
        return cls(form, int(tensors["step"][0]), params, moments)


def initial_adapter(bundle: Path, manifest: Manifest, rank: int, with_head: bool) -> Adapter:
    """The bundle's initial adapter of tier `rank` (what a device starts from without a global)."""
    tier = manifest.tier(rank)
    values = load_file(str(Path(bundle) / tier.dir / tier.trainable_init))
    return adapter_from_parameters(manifest, rank, values, with_head=with_head)


def initial_state(start: Adapter, layers: Mapping[str, LayerSpec], form: StateForm) -> ServerState:
    """The state every tier starts from: `start` (the top tier's initial adapter) as ΔW_g or as factors."""
    params: dict[str, np.ndarray] = {}
    for name, (a, b) in start.lora.items():
        if form == "exact":
            params[f"{name}::W"] = (layers[name].scaling(start.rank) * (b.astype(np.float64) @ a)).astype(np.float32)
        else:
            params[f"{name}::A"], params[f"{name}::B"] = a.astype(np.float32), b.astype(np.float32)
    params.update({HEAD + k: v.astype(np.float32) for k, v in start.head.items()})
    return ServerState(form, 0, params, {})


def step(state: ServerState, grads: Mapping[str, np.ndarray], optimizer: ServerOptimizer) -> ServerState:
    """One server step with the pseudo-gradient `grads` (same keys as `state.params`)."""
    t = state.step + 1
    params, moments = dict(state.params), dict(state.moments)
    for key, g in grads.items():
        g = g.astype(np.float64)
        lr = optimizer.head_lr if key.startswith(HEAD) and optimizer.head_lr is not None else optimizer.lr
        lr *= optimizer.lr_factor(t)
        first = 1.0 if optimizer.name == "sgd" else 1 - optimizer.beta1
        m = optimizer.beta1 * moments.get(f"m::{key}", 0.0) + first * g
        moments[f"m::{key}"] = np.asarray(m, dtype=np.float32)
        if optimizer.name == "sgd":
            delta = lr * m
        else:
            delta = lr * (m / (1 - optimizer.beta1**t)) / _denominator(moments, key, g, optimizer, t)
        params[key] = (params[key].astype(np.float64) + delta).astype(np.float32)
    return ServerState(state.form, t, params, moments)


def _denominator(moments: dict[str, np.ndarray], key: str, g: np.ndarray, optimizer: ServerOptimizer,
                 t: int) -> np.ndarray:
    """Update the second-moment state of `key` in `moments`; returns √v̂ + eps, what m̂ is divided by.

    adafactor keeps a matrix's second moment as row and column means, v̂ ≈ r cᵀ / mean(r), and
    divides by (√r̂ + √eps)(√ĉ + √eps)ᵀ up to the mean: an outer product, so the step scales rows
    and columns only and keeps the rank of m, where adam's per-entry scaling spreads a low-rank
    update over every direction.
    """
    b2, square, correction = optimizer.beta2, g * g, 1 - optimizer.beta2**t
    if optimizer.name == "adafactor" and g.ndim == 2:
        rows = b2 * moments.get(f"v::{key}::rows", 0.0) + (1 - b2) * square.mean(axis=1)
        cols = b2 * moments.get(f"v::{key}::cols", 0.0) + (1 - b2) * square.mean(axis=0)
        moments[f"v::{key}::rows"], moments[f"v::{key}::cols"] = rows.astype(np.float32), cols.astype(np.float32)
        rows = moments[f"v::{key}::rows"].astype(np.float64) / correction
        cols = moments[f"v::{key}::cols"].astype(np.float64) / correction
        quarter = max(float(rows.mean()), 1e-30) ** 0.25
        root = np.sqrt(optimizer.eps)
        return np.outer(np.sqrt(rows) / quarter + root, np.sqrt(cols) / quarter + root)
    v_old = moments.get(f"v::{key}", np.zeros_like(g))
    if optimizer.name == "yogi":
        v = v_old - (1 - b2) * square * np.sign(v_old - square)
    else:
        v = b2 * v_old + (1 - b2) * square
    moments[f"v::{key}"] = v.astype(np.float32)
    return np.sqrt(np.maximum(moments[f"v::{key}"].astype(np.float64), 0.0) / correction) + optimizer.eps


def tier_adapters(state: ServerState, layers: Mapping[str, LayerSpec], ranks: list[int],
                  filler: Mapping[str, np.ndarray]) -> tuple[dict[int, Adapter], dict[str, SvdFactors]]:
    """Each tier's adapter from the state, and the SVD of every layer's ΔW_g (kept with the round).

    `filler`: layer → rows (≥ the top rank, × in) that seed the directions ΔW_g does not have yet.
    """
    head = {k[len(HEAD):]: v for k, v in state.params.items() if k.startswith(HEAD)}
    svds = _svds(state, layers)
    tiers = {}
    for rank in sorted(set(ranks)):
        lora = {}
        for name, spec in layers.items():
            if state.form == "exact":
                lora[name] = _exact_tier(svds[name], rank, spec.scaling(rank), filler[name])
            else:
                lora[name] = (state.params[f"{name}::A"][:rank].copy(), state.params[f"{name}::B"][:, :rank].copy())
        tiers[rank] = Adapter(rank=rank, lora=lora, head=dict(head))
    return tiers, svds


def _svds(state: ServerState, layers: Mapping[str, LayerSpec]) -> dict[str, SvdFactors]:
    """SVD of each layer's ΔW_g, batched over layers of one shape: from the factors without forming ΔW_g,
    or of the dense ΔW_g through its Gram matrix, on the merge's backend."""
    out: dict[str, SvdFactors] = {}
    for shape in sorted({(spec.out_features, spec.in_features) for spec in layers.values()}):
        names = [n for n, spec in layers.items() if (spec.out_features, spec.in_features) == shape]
        if state.form == "factors":
            rank = state.params[f"{names[0]}::A"].shape[0]
            p = np.stack([layers[n].scaling(rank) * state.params[f"{n}::B"].astype(np.float64) for n in names])
            q = np.stack([state.params[f"{n}::A"].astype(np.float64) for n in names])
            out.update(zip(names, svd_of_product(p, q)))
            continue
        backend = default_backend()
        dense = backend.asarray(np.stack([state.params[f"{n}::W"].astype(np.float64) for n in names]))
        u, s, v = (backend.numpy(x) for x in svd_by_gram(dense, backend.xp))
        keep = min(KEPT_COMPONENTS, s.shape[1])
        out.update({n: SvdFactors(u[i, :, :keep], s[i, :keep], v[i, :, :keep]) for i, n in enumerate(names)})
    return out


def _exact_tier(svd: SvdFactors, rank: int, scaling: float, filler: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """B = U_k Σ_k / s, A = V_kᵀ for the k ≤ rank directions ΔW_g has; the rest of A from `filler`
    made orthonormal to them, with B = 0 there."""
    tolerance = max(float(svd.s[0]) if svd.s.size else 0.0, 1e-30) * 1e-6
    k = int(min(rank, np.sum(svd.s > tolerance)))
    a = np.empty((rank, svd.v.shape[0]))
    b = np.zeros((svd.u.shape[0], rank))
    a[:k] = svd.v[:, :k].T
    b[:, :k] = svd.u[:, :k] * (svd.s[:k] / scaling)
    if k < rank:
        seeds = filler[: rank - k].astype(np.float64)
        seeds = seeds - (seeds @ svd.v[:, :k]) @ svd.v[:, :k].T
        q, _ = np.linalg.qr(seeds.T)
        a[k:] = q.T
    return a.astype(np.float32), b.astype(np.float32)
