"""A round's merge: LoRA factors by the chosen strategy, the shared task head by sample-weighted FedAvg."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from aggregator.bounds import SAMPLE_CAP, bounded_counts, capped_shares, norm_clip
from aggregator.calibration import OFFSETS, calibration_step, with_offsets
from aggregator.closed_form import solved_head
from aggregator.privacy import KEY, LEDGER, DpSettings, Sampling, noise_generator
from aggregator.server_state import HEAD, ServerOptimizer, ServerState, step, tier_adapters
from aggregator.strategies import ClientUpdate, MergeResult, get_strategy
from aggregator.strategies.base import layer_specs_from_manifest
from edge_sdk.protocol import AdapterHeader
from edge_sdk.protocol.adapter import Adapter
from edge_sdk.protocol.codec import STATISTICS_KEYS
from edge_sdk.protocol.manifest import Manifest

def check_strategy(name: str, manifest: Manifest | None = None) -> None:
    """Raise ValueError for an unknown strategy, one the device protocol cannot run, or one `manifest` does not suit."""
    try:
        spec = get_strategy(name)
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    if manifest is not None and spec.frozen_a != (manifest.lora.frozen_a_seed is not None):
        raise ValueError(f"{name} needs every device to hold the same frozen A (`fedpeft-export --freeze-lora-a`), "
                         "and a bundle with frozen A suits ffa-lora only; export the bundle to match the strategy."
                         if spec.frozen_a else
                         f"This bundle freezes LoRA A (--freeze-lora-a), which suits ffa-lora only, not {name}; "
                         "export the bundle to match the strategy.")
    if manifest is not None and manifest.lora.full_finetune:
        raise ValueError("This bundle trains every model weight (--full-finetune); the protocol carries adapters. "
                         "Run it with `fedpeft-sim run --strategy full-fedavg`, or export a LoRA bundle.")
    if spec.device_blocker is not None:
        raise ValueError(f"Strategy '{name}' cannot run on devices: {spec.device_blocker}. Choose another "
                         "--strategy; its merge function stays available in aggregator.strategies.")


def merge_round(
    strategy: str, updates: Mapping[str, tuple[AdapterHeader, Adapter]], manifest: Manifest,
    sample_cap: float = SAMPLE_CAP,
) -> tuple[dict[int, Adapter], MergeResult]:
    """Per-tier global adapters (LoRA + averaged head) from accepted updates, in client-id order,
    each sample count bounded by `bounded_counts`.

    Sorting makes the result independent of arrival order bit for bit, which is what lets a
    restarted aggregator reproduce an uninterrupted run exactly.
    """
    ordered = [updates[cid] for cid in sorted(updates)]
    counts = bounded_counts([h.num_samples for h, _ in ordered], sample_cap)
    client_updates = [ClientUpdate(client_id=h.client_id, rank=a.rank, num_samples=n, factors=a.lora)
                      for n, (h, a) in zip(counts, ordered)]
    result = get_strategy(strategy)(client_updates, layer_specs_from_manifest(manifest), manifest.ranks)
    head = _average_heads([(n, a.head) for n, (_, a) in zip(counts, ordered)])
    tiers = {rank: Adapter(rank=rank, lora=dict(lora), head=head) for rank, lora in result.tiers.items()}
    return tiers, result


def _average_heads(heads: list[tuple[int, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """FedAvg of the (sample count, head) pairs that carry a head, no share above `bounds.SHARE_CAP` × the
    low median share; empty when the head stays local."""
    with_head = [(n, head) for n, head in heads if head]
    if not with_head:
        return {}
    counts = np.array([n for n, _ in with_head], dtype=np.float64)
    shares = capped_shares(counts / counts.sum())
    return {
        name: sum(w * head[name].astype(np.float64) for w, (_, head) in zip(shares, with_head)).astype(np.float32)
        for name in with_head[0][1]
    }


def _clipped_head_updates(updates: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Each head update (all head tensors together) scaled down to at most `bounds.NORM_CAP` × the round's
    low median norm: the device chooses its head as freely as its LoRA factors."""
    norms = np.array([np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in u.values()))
                      for u in updates])
    return [{k: (c * v).astype(np.float32) for k, v in u.items()} for c, u in zip(norm_clip(norms), updates)]


def merge_with_server(
    strategy: str, updates: Mapping[str, tuple[AdapterHeader, Adapter]], sent: Mapping[int, Adapter],
    state: ServerState, optimizer: ServerOptimizer, manifest: Manifest, filler: Mapping[str, np.ndarray],
    sample_cap: float = SAMPLE_CAP, closed_form: bool = False, privacy: DpSettings | None = None,
    sampling: Sampling | None = None,
) -> tuple[dict[int, Adapter], MergeResult, ServerState]:
    """Per-tier adapters from the server state stepped with the round's pseudo-gradient.

    `sent` holds the tier adapters the clients started from (the previous round's globals); the
    strategy merges each client's update against them, and the head's pseudo-gradient is the
    sample-weighted mean of the head updates (counts bounded as in `merge_round`, each update's norm clipped
    like the adapters'). Where the updates
    carry feature statistics, the head is instead solved in closed form from them (`closed_form`),
    pooled over rounds in the state; with `closed_form` and none sent (the rounds after
    `TrainingConfig.statistics_rounds`) the head stays as solved last. A private strategy (dp-fedavg)
    merges the head with the adapter under `privacy`, with noise from the state's secret key, and
    adds the round's `sampling` to the state's privacy ledger. Where the updates carry prior statistics,
    the output bias takes the prior-matching step and each tier's offset its own (`calibration`): the
    offsets stay out of the state's bias and go into the tiers' globals, and each head update counts from
    its own tier's global. The result's `global_state` is the new ΔW_g's SVD.
    """
    spec = get_strategy(strategy)
    ordered = [updates[cid] for cid in sorted(updates)]
    counts = bounded_counts([h.num_samples for h, _ in ordered], sample_cap)
    client_updates = [ClientUpdate(client_id=h.client_id, rank=a.rank, num_samples=n, factors=a.lora,
                                   sent=sent[a.rank].lora) for n, (h, a) in zip(counts, ordered)]
    layers = layer_specs_from_manifest(manifest)
    if spec.private:
        if privacy is None or sampling is None or KEY not in state.moments:
            raise ValueError(f"{strategy} needs the privacy settings, the round's sampling and a server state "
                             "that holds the noise key.")
        if closed_form:
            raise ValueError(f"{strategy} takes no feature statistics: they would leave the devices unprotected.")
        heads = {h.client_id: {k: v - sent[a.rank].head[k] for k, v in a.head.items()} for h, a in ordered}
        result = spec(client_updates, layers, manifest.ranks, clip=privacy.clip,
                      noise_multiplier=privacy.noise_multiplier, sampled=sampling.sampled,
                      rng=noise_generator(state.moments[KEY], state.step + 1), head_updates=heads)
    else:
        result = spec(client_updates, layers, manifest.ranks)
    grads: dict[str, np.ndarray] = {}
    if state.form == "exact":
        grads.update({f"{name}::W": factors.dense() for name, factors in result.global_state.items()})
    else:
        for name, (a, b) in result.tiers[max(manifest.ranks)].items():
            grads[f"{name}::B"] = b
            if not spec.frozen_a:
                grads[f"{name}::A"] = a
    statistics = [a.statistics for _, a in ordered if a.statistics is not None]
    if result.head is not None:
        grads.update({HEAD + name: value for name, value in result.head.items()})
    elif not statistics and not closed_form:
        changes = _clipped_head_updates([{k: v - sent[a.rank].head[k] for k, v in a.head.items()} for _, a in ordered])
        heads = _average_heads(list(zip(counts, changes)))
        grads.update({HEAD + name: value for name, value in heads.items()})
    new_state = step(state, grads, optimizer)
    priors = [(a.rank, n / h.num_samples, a.prior) for n, (h, a) in zip(counts, ordered) if a.prior is not None]
    if priors:
        bias = HEAD + str(manifest.output_bias)
        common, _ = calibration_step(new_state.moments, manifest.ranks, priors)
        new_state.params[bias] = (new_state.params[bias] + common).astype(np.float32)
    if spec.private:
        new_state.moments[LEDGER] = np.concatenate([state.moments.get(LEDGER, np.zeros((0, 3))),
                                                    sampling.ledger_row(privacy.noise_multiplier)])
    if statistics:
        (weight, bias), pooled = solved_head({k: v for k, v in state.moments.items() if k in STATISTICS_KEYS},
                                             statistics, sample_cap)
        new_state.params[HEAD + str(manifest.output_weight)] = weight
        new_state.params[HEAD + str(manifest.output_bias)] = bias
        new_state.moments.update(pooled)
    tiers, svds = tier_adapters(new_state, layers, manifest.ranks, filler)
    if OFFSETS in new_state.moments:
        with_offsets(tiers, new_state.moments[OFFSETS], str(manifest.output_bias))
    return tiers, replace(result, global_state=svds), new_state
