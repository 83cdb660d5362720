"""The base image directory as the executor uses it: manifest.json plus the files it names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from executor.errors import ConfigError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class BaseImage:
    dir: Path
    disk: Path
    kernel: Path
    initrd: Path
    cmdline: str
    user: str
    virtual_bytes: int
    manifest: dict


def load_base_image(directory: str | Path) -> BaseImage:
    d = Path(directory)
    hint = "(build it with `libvirt-executor image build`)"
    try:
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no base image in {d}: {MANIFEST} is missing {hint}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"base image manifest {d / MANIFEST} is unreadable: {exc} {hint}") from None
    problems = []
    paths = {}
    for key in ("disk", "kernel", "initrd"):
        name = manifest.get(key)
        if not isinstance(name, str) or "/" in name or not name:
            problems.append(f"manifest key {key!r} is missing or not a plain file name")
            continue
        paths[key] = d / name
        if not paths[key].is_file():
            problems.append(f"{paths[key]} is missing")
    cmdline = manifest.get("cmdline")
    if not isinstance(cmdline, str) or not cmdline:
        problems.append("manifest key 'cmdline' is missing")
    if problems:
        raise ConfigError(f"base image in {d} is incomplete: " + "; ".join(problems) + f" {hint}")
    sizes = manifest.get("sizes") if isinstance(manifest.get("sizes"), dict) else {}
    virtual = sizes.get("virtual_bytes")
    return BaseImage(
        dir=d,
        disk=paths["disk"],
        kernel=paths["kernel"],
        initrd=paths["initrd"],
        cmdline=cmdline,
        user=str(manifest.get("user") or "runner"),
        virtual_bytes=virtual if isinstance(virtual, int) and virtual > 0 else 0,
        manifest=manifest,
    )
