"""The one-command demo: export MiniLM + LoRA, train a tier on device, then run a federation over MQTT.

Every step runs in its own process, as on real hardware: the export (torch), the device
trainer (onnxruntime only), the aggregator, and three devices of different tiers that join it over
a local MQTT broker (mosquitto with a generated login per device and the shipped ACL where it is
installed, else the embedded amqtt). The federated adapter is compared with the untrained one on
held-out reviews at the end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

from aggregator.broker import AGGREGATOR_USER, EmbeddedBroker, Mosquitto, local_broker
from edge_sdk.data import Example, stratified_split
from edge_sdk.datasets import rotten_tomatoes, shard
from edge_sdk.files import write_atomic
from edge_sdk.protocol import decode_adapter
from edge_sdk.protocol.manifest import BundleError, read_manifest
from edge_sdk.trainer import Trainer
from fedpeft_sim import plots

DEVICES = ("low", "mid", "high")


@click.command()
@click.option("--workdir", default="runs/demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--rank", type=int, default=8, show_default=True, help="Tier of the single-device step.")
@click.option("--steps", type=click.IntRange(min=1), default=150, show_default=True,
              help="Steps of the single-device step.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="Federated rounds.")
@click.option("--local-steps", type=click.IntRange(min=1), default=40, show_default=True,
              help="Steps per device per round.")
@click.option("--re-export", is_flag=True, help="Export the bundle again even if one exists.")
def main(workdir: Path, rank: int, steps: int, rounds: int, local_steps: int, re_export: bool) -> None:
    """Export (once), train on one device, then federate three devices of different tiers."""
    bundle = workdir / "bundle"
    start = time.perf_counter()
    if re_export or not _usable(bundle):
        click.secho("1/3 fedpeft-export: MiniLM-L6 + LoRA → onnxruntime-training bundle", bold=True)
        _run([sys.executable, "-m", "export.cli", "--out", str(bundle), "--force", "--labels", "rotten,fresh"])
    else:
        click.secho(f"1/3 reusing the bundle in {bundle} (--re-export to rebuild)", bold=True)
    click.secho(f"2/3 on-device training of tier r={rank} (onnxruntime-training, torch not imported)", bold=True)
    _run([sys.executable, str(Path(__file__).with_name("train_on_device.py")), "--bundle", str(bundle), "--rank", str(rank),
          "--steps", str(steps)])
    click.secho(f"3/3 federation: aggregator + local MQTT broker, {len(DEVICES)} devices "
                f"({', '.join(DEVICES)} tiers), {rounds} rounds", bold=True)
    _federate(bundle, workdir / "federation", rounds, local_steps)
    click.echo(f"Demo finished in {time.perf_counter() - start:.0f} s.")


def _federate(bundle: Path, folder: Path, rounds: int, local_steps: int) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    pool, held_out = stratified_split(rotten_tomatoes(), test_fraction=0.1, seed=0)
    state, logs = folder / "state", folder / "logs"
    logs.mkdir(parents=True)
    device_ids = [f"{preset}-device" for preset in DEVICES]
    with local_broker(folder / "broker", device_ids) as broker:
        aggregator = _spawn([sys.executable, "-m", "aggregator.cli", *_login(broker, AGGREGATOR_USER, folder),
                             "--federation", "demo", "--rounds", str(rounds),
                             "--clients-per-round", str(len(DEVICES)), "--min-clients", str(len(DEVICES)),
                             "--steps", str(local_steps), "--lr", "3e-3", "--server-opt", "none",
                             "--normalizers", "2048,0.1,300",
                             "--bundle", str(bundle), "--state-dir", str(state),
                             "--metrics", str(state / "metrics.jsonl")], logs / "aggregator.log")
        devices = []
        for i, (preset, device_id) in enumerate(zip(DEVICES, device_ids)):
            data = folder / f"device{i}.jsonl"
            data.write_text("".join(json.dumps({"text": e.x, "label": e.label}) + "\n"
                                    for e in shard(pool, i, len(DEVICES))[:400]))
            devices.append(_spawn([sys.executable, "-m", "edge_sdk.client_cli", "--bundle", str(bundle),
                                   *_login(broker, device_id, folder), "--federation", "demo", "--data", str(data),
                                   "--client-id", device_id, "--profile", preset, "--state-dir",
                                   str(folder / "devices")], logs / f"{device_id}.log"))
        _watch(aggregator, devices, state / "metrics.jsonl", logs, rounds)
    _report(bundle, held_out, state / "metrics.jsonl", folder, rounds)


def _login(broker: Mosquitto | EmbeddedBroker, user: str, folder: Path) -> list[str]:
    """--broker (and, where the broker has logins, --username and a --password-file only `user` reads) for `user`."""
    settings = broker.login(user)
    args = ["--broker", f"mqtt://{settings.host}:{settings.port}"]
    if settings.password is None:
        return args
    secret = folder / "logins" / user
    secret.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(secret, (settings.password + "\n").encode())
    return [*args, "--username", user, "--password-file", str(secret)]


def _watch(aggregator: subprocess.Popen, devices: list[subprocess.Popen], metrics: Path, logs: Path,
           rounds: int) -> None:
    """Print device events and rounds as they happen until the aggregator ends; all must exit cleanly."""
    shown, seen = 0, {}
    click.echo(f"  devices profile themselves, choose their tiers and train (device logs in {logs}):")
    while aggregator.poll() is None:
        seen = _device_events(logs, seen)
        shown = _progress(metrics, shown, rounds)
        if any(p.poll() not in (None, 0) for p in devices):
            aggregator.terminate()
        time.sleep(1)
    _device_events(logs, seen)
    _progress(metrics, shown, rounds)
    for process in [aggregator, *devices]:
        if process.wait() != 0:
            raise click.ClickException(f"{process.args[2]} failed; see the logs in {logs}.")


def _report(bundle: Path, held_out: list[Example], metrics: Path, folder: Path, rounds: int) -> None:
    """Score each round's global adapter on held-out reviews, print the table and write the plots."""
    state = metrics.parent
    manifest = read_manifest(bundle)
    top = max(manifest.ranks)
    trainer, test = Trainer(bundle, top), held_out[:600]
    rows = [{"round": 0, "central_accuracy": trainer.evaluate(test).accuracy, "bytes_up": 0}]
    click.echo(f"{'round':>5} {'devices (tier)':<34} {'upload KB':>10} {'vs full FedAvg':>15} {f'accuracy r={top}':>14}")
    click.echo(f"{0:>5} {'untrained adapter':<34} {'':>10} {'':>15} {rows[0]['central_accuracy']:>14.3f}")
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        global_file = state / "rounds" / f"{record['round']:04d}" / f"global-r{top}.fpa"
        trainer.load_state(None, decode_adapter(global_file.read_bytes(), manifest)[1])
        rows.append({"round": record["round"], "central_accuracy": trainer.evaluate(test).accuracy,
                     "bytes_up": record["bytes_accepted"], "full_fedavg_bytes_up": record["full_fedavg_bytes_up"]})
        tiers = ", ".join(f"{c.split('-')[0]} r={r}" for c, r in sorted(record["ranks"].items()))
        click.echo(f"{record['round']:>5} {tiers:<34} {record['bytes_accepted'] / 1e3:>10.0f} "
                   f"{record['bytes_accepted'] / record['full_fedavg_bytes_up']:>14.3%} "
                   f"{rows[-1]['central_accuracy']:>14.3f}")
    label = f"federated adapter r={top} (svd-weighted merge)"
    click.echo(f"Accuracy on {len(test)} held-out reviews. Plots: "
               f"{plots.accuracy_per_round({label: rows}, 'Demo federation: 3 devices', folder / 'accuracy.png')}, "
               f"{plots.accuracy_per_byte({label: rows[1:]}, 'Demo federation: accuracy vs upload', folder / 'bytes.png')}")
    click.echo(f"Hugging Face peft folder of the last round: {state / 'rounds' / f'{rounds:04d}' / 'peft'}")


def _progress(metrics: Path, shown: int, rounds: int) -> int:
    """Print the rounds that closed since the last call; returns how many are shown."""
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    for line in lines[shown:]:
        record = json.loads(line)
        click.echo(f"  round {record['round']}/{rounds} closed: {len(record['participants'])} devices, "
                   f"{record['bytes_accepted'] / 1e3:.0f} KB up, merge {1000 * record['merge_seconds']:.0f} ms")
    return len(lines)


DEVICE_EVENTS = (" joined ", " uploaded (")
"""What the demo echoes from the device logs: a device joining at its tier, and each upload."""


def _device_events(logs: Path, seen: dict[Path, int]) -> dict[Path, int]:
    """Print the device-log lines of DEVICE_EVENTS written since the last call; returns lines read per log."""
    for log in sorted(logs.glob("*-device.log")):
        lines = log.read_text(errors="replace").splitlines()
        for line in lines[seen.get(log, 0):]:
            if any(event in line for event in DEVICE_EVENTS):
                click.echo(f"    {line.split(' INFO ', 1)[-1]}")
        seen[log] = len(lines)
    return seen


def _spawn(command: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def _usable(bundle: Path) -> bool:
    try:
        read_manifest(bundle)
    except BundleError:
        return False
    return True


def _run(command: list[str]) -> None:
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise click.ClickException(f"'{' '.join(command[1:4])} …' failed with exit code {result.returncode}.")


if __name__ == "__main__":
    main()
