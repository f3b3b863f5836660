"""Unpack Debian packages of another architecture, with their dependencies, into a folder for qemu-user's -L.

Reads the release's package index from the mirror, resolves Depends and Pre-Depends (the first alternative
that the index has; version bounds are the release's own, so they hold), checks each .deb's SHA-256 against
the index, and extracts it with `dpkg -x`. No root, no apt configuration, nothing installed on the host.
Usage: python3 scripts/debian_root.py ROOT PACKAGE... [--arch arm64] [--release bookworm]
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import subprocess
import sys
import urllib.request
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"
SKIP = {"debconf", "dpkg", "perl-base", "install-info", "tzdata", "readline-common", "debianutils"}
"""Packages the emulated interpreter never runs: maintainer-script tooling and data it does not read."""


def index(arch: str, release: str) -> dict[str, dict[str, str]]:
    """Package name → its stanza (Filename, SHA256, Depends, ...) from the release's main index."""
    url = f"{MIRROR}/dists/{release}/main/binary-{arch}/Packages.xz"
    with urllib.request.urlopen(url, timeout=120) as response:
        text = lzma.decompress(response.read()).decode()
    packages: dict[str, dict[str, str]] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith((" ", "\t")) and key:
                fields[key] += line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields:
            packages[fields["Package"]] = fields
    return packages


def closure(packages: dict[str, dict[str, str]], wanted: list[str]) -> list[str]:
    """`wanted` and everything they depend on, first alternatives that exist, minus SKIP."""
    seen: set[str] = set()
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name in seen or name in SKIP:
            continue
        if name not in packages:
            raise SystemExit(f"{name} is not in the package index; check the package names and --release.")
        seen.add(name)
        fields = packages[name]
        for relation in ", ".join(filter(None, (fields.get("Pre-Depends"), fields.get("Depends")))).split(","):
            choices = [alt.strip().split(" ")[0].split(":")[0] for alt in relation.split("|") if alt.strip()]
            present = [c for c in choices if c in packages]
            if present:
                todo.append(present[0])
    return sorted(seen)


def fetch(fields: dict[str, str], debs: Path) -> Path:
    """The package's .deb in `debs`, downloaded once and checked against the index's SHA-256."""
    path = debs / Path(fields["Filename"]).name
    if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != fields["SHA256"]:
        with urllib.request.urlopen(f"{MIRROR}/{fields['Filename']}", timeout=300) as response:
            data = response.read()
        if hashlib.sha256(data).hexdigest() != fields["SHA256"]:
            raise SystemExit(f"{path.name}: SHA-256 differs from the package index; retry, or use another mirror.")
        path.write_bytes(data)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("packages", nargs="+")
    parser.add_argument("--arch", default="arm64")
    parser.add_argument("--release", default="bookworm")
    args = parser.parse_args()
    packages = index(args.arch, args.release)
    names = closure(packages, args.packages)
    debs = args.root / ".debs"
    debs.mkdir(parents=True, exist_ok=True)
    for name in names:
        subprocess.run(["dpkg", "-x", str(fetch(packages[name], debs)), str(args.root)], check=True)
    print(f"{len(names)} {args.arch} packages unpacked into {args.root}", file=sys.stderr)


if __name__ == "__main__":
    main()
