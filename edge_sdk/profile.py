"""Device profile: memory available for training, measured compute, local data size, accelerators.

Compute is not read from CPU MHz: it is the training steps/s of the bundle's smallest tier on a
real batch of the device's own data, measured in a child process (`edge_sdk.probe`) that also
yields that tier's peak memory. Presets cap memory and threads so one machine can play many
devices in experiments.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
from safetensors.numpy import save_file

from edge_sdk.data import Example
from edge_sdk.encoders import encoder_for
from edge_sdk.files import write_atomic
from edge_sdk.runtime import onnxruntime, resolve_backend
from edge_sdk.protocol.manifest import Manifest, bundle_id, read_manifest
from edge_sdk.protocol.ranking import DeviceProfile

MIB = 1 << 20
PROBE_PAD_MULTIPLE = 16


@dataclass(frozen=True)
class DevicePreset:
    """Caps for a simulated device: training memory, onnxruntime threads, and a compute factor.

    `compute_factor` scales the measured steps/s to stand for slower silicon than the host
    (a phone or a Raspberry Pi core); the measurement itself still runs.
    """

    name: str
    memory_bytes: int
    threads: int
    compute_factor: float


PRESETS: dict[str, DevicePreset] = {
    "low": DevicePreset("low", 512 * MIB, 1, 0.25),
    "mid": DevicePreset("mid", 1024 * MIB, 1, 0.5),
    "high": DevicePreset("high", 4096 * MIB, 2, 1.0),
}


@dataclass(frozen=True)
class TierProbe:
    """Measured peak RSS of a process training a tier, and its training steps/s."""

    rank: int
    peak_rss_bytes: int
    steps_per_second: float


class ProbeCache:
    """Tier measurements kept in a JSON file so a device measures each tier once per batch shape."""

    def __init__(self, path: str | Path | None = None) -> None:
        default = Path(os.environ.get("FEDPEFT_CACHE", Path.home() / ".cache" / "fedpeft")) / "tier-probes.json"
        self.path = Path(path) if path else default

    def get(self, key: str) -> TierProbe | None:
        entry = self._read().get(key)
        return TierProbe(**entry) if entry else None

    def put(self, key: str, probe: TierProbe) -> None:
        entries = {**self._read(), key: asdict(probe)}
        write_atomic(self.path, json.dumps(entries, indent=1, sort_keys=True).encode())

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}


class Prober:
    """Measures tiers of one bundle on one worst-case batch, through the cache."""

    def __init__(
        self, bundle: str | Path, batch: dict[str, np.ndarray], threads: int | None = None, device: str = "cpu",
        cache: ProbeCache | None = None, seconds: float = 2.0,
    ) -> None:
        self.bundle, self.batch, self.threads, self.device, self.seconds = Path(bundle), batch, threads, device, seconds
        self.manifest = read_manifest(self.bundle)
        self.cache = cache or ProbeCache()

    def __call__(self, rank: int) -> TierProbe:
        shape = "x".join(str(d) for d in next(iter(self.batch.values())).shape)
        key = f"{bundle_id(self.bundle)}|r{rank}|{shape}|t{self.threads}|{self.device}"
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        probe = _run_probe(self.bundle, rank, self.batch, self.threads, self.device, self.seconds)
        self.cache.put(key, probe)
        return probe


def worst_case_batch(bundle: str | Path, manifest: Manifest, examples: Sequence[Example], batch_size: int) -> dict[str, np.ndarray]:
    """The graph inputs (+ labels) of the `batch_size` longest local examples: the peak-memory batch.

    Text is padded up to a multiple of 16 tokens: the estimate errs on the safe side, and devices
    with similar data share one cached measurement instead of probing each length.
    """
    if not examples:
        raise ValueError("Profiling needs local examples: the dataset is empty.")
    encoder = encoder_for(bundle, manifest, pad_to_multiple_of=PROBE_PAD_MULTIPLE)
    lengths = encoder.lengths(examples)
    order = range(len(examples)) if lengths is None else np.argsort(lengths)[::-1]
    chosen = [examples[i] for i in list(order)[:batch_size]]
    feeds = encoder(chosen)
    if manifest.label_input.axes == ["tokens"]:
        from edge_sdk.language import next_token_labels

        feeds["labels"] = next_token_labels(feeds["input_ids"], feeds["attention_mask"])
    else:
        feeds["labels"] = np.array([e.label for e in chosen], dtype=np.int64)
    return feeds


def profile_device(
    bundle: str | Path,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    preset: str | DevicePreset | None = None,
    threads: int | None = None,
    device: str = "cpu",
    cache: ProbeCache | None = None,
) -> tuple[DeviceProfile, Prober]:
    """Profile this device for `bundle`; also returns the prober the rank choice uses for memory."""
    chosen = PRESETS[preset] if isinstance(preset, str) else preset
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    threads = threads or (chosen.threads if chosen else cores)
    memory = int(psutil.virtual_memory().available)
    if chosen:
        memory = min(memory, chosen.memory_bytes)
    manifest = read_manifest(bundle)
    prober = Prober(bundle, worst_case_batch(bundle, manifest, examples, batch_size), threads, device, cache)
    compute = prober(min(manifest.ranks)).steps_per_second * (chosen.compute_factor if chosen else 1.0)
    profile = DeviceProfile(
        memory_bytes=memory, compute=compute, num_samples=len(examples), cpu_cores=cores, threads=threads,
        device=device, providers=list(onnxruntime().get_available_providers()), preset=chosen.name if chosen else None,
        backend=resolve_backend("auto"),
    )
    return profile, prober


def _run_probe(bundle: Path, rank: int, batch: dict[str, np.ndarray], threads: int | None, device: str,
               seconds: float) -> TierProbe:
    with tempfile.TemporaryDirectory(prefix="fedpeft-probe-") as folder:
        batch_file = Path(folder) / "batch.safetensors"
        save_file(batch, str(batch_file))
        command = [sys.executable, "-m", "edge_sdk.probe", "--bundle", str(bundle), "--rank", str(rank),
                   "--batch", str(batch_file), "--device", device, "--seconds", str(seconds)]
        if threads:
            command += ["--threads", str(threads)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"Probing tier r={rank} failed:\n{done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return TierProbe(rank=rank, peak_rss_bytes=int(result["peak_rss_bytes"]), steps_per_second=float(result["steps_per_second"]))
