"""Checks that Cargo.toml's rust-version covers every dependency's own.

clippy's `incompatible_msrv` lint (on in `make lint`) checks the project's own
code against rust-version; this checks the dependency tree, which is what
raised the real minimum before.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    declared = tomllib.loads((root / "Cargo.toml").read_text())["package"]["rust-version"]
    metadata = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--all-features", "--locked"],
            cwd=root,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    newer = [
        f"{p['name']} {p['version']} needs Rust {p['rust_version']}"
        for p in metadata["packages"]
        if p.get("rust_version") and version(p["rust_version"]) > version(declared)
    ]
    if newer:
        print(f"Cargo.toml says rust-version = {declared!r}, but:", *newer, sep="\n  ")
        return 1
    print(f"rust-version {declared} covers every dependency")
    return 0


if __name__ == "__main__":
    sys.exit(main())
