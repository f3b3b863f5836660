"""The one-command demo: export the default MiniLM bundle, then train a tier on device (no torch)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import click

from edge_sdk.manifest import BundleError, read_manifest


@click.command()
@click.option("--workdir", default="runs/demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--rank", type=int, default=8, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=150, show_default=True)
@click.option("--re-export", is_flag=True, help="Export the bundle again even if one exists.")
def main(workdir: Path, rank: int, steps: int, re_export: bool) -> None:
    """Export (once) and train on device; each step runs in its own process like on real hardware."""
    bundle = workdir / "bundle"
    start = time.perf_counter()
    if re_export or not _usable(bundle):
        click.secho("1/2 fedpeft-export: MiniLM-L6 + LoRA → onnxruntime-training bundle", bold=True)
        _run([sys.executable, "-m", "export.cli", "--out", str(bundle), "--force"])
    else:
        click.secho(f"1/2 reusing the bundle in {bundle} (--re-export to rebuild)", bold=True)
    click.secho(f"2/2 on-device training of tier r={rank} (onnxruntime-training, torch not imported)", bold=True)
    _run([sys.executable, "-m", "examples.train_on_device", "--bundle", str(bundle), "--rank", str(rank),
          "--steps", str(steps)])
    click.echo(f"Demo finished in {time.perf_counter() - start:.0f} s.")


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
