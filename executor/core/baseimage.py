"""The base image directory as the executor uses it: manifest.json plus the files it names."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from executor.core.imagerecipe import BUILDS_DIR, CACHE_DIR, JOB_USER, MANIFEST
from executor.core.jsonvalues import object_at
from executor.errors import ConfigError

_HINT = "(build it with `libvirt-executor image build`)"


@dataclass(frozen=True)
class BaseImage:
    dir: Path
    disk: Path
    kernel: Path
    initrd: Path
    cmdline: str
    user: str
    builds_dir: str
    cache_dir: str
    virtual_bytes: int
    manifest: dict[str, Any]


def parse_base_image(directory: Path, manifest_text: str | None, is_file: Callable[[Path], bool]) -> BaseImage:
    """The image in `directory` from its manifest's text (None: there is none); `is_file` says
    whether a file the manifest names exists. ConfigError, with the fix, for anything missing."""
    d = directory
    if manifest_text is None:
        raise ConfigError(f"no base image in {d}: {MANIFEST} is missing {_HINT}")
    try:
        manifest = json.loads(manifest_text)
    except ValueError as exc:
        raise ConfigError(f"base image manifest {d / MANIFEST} is unreadable: {exc} {_HINT}") from None
    if not isinstance(manifest, dict):
        raise ConfigError(f"base image manifest {d / MANIFEST} is not a JSON object {_HINT}")
    problems = []
    paths = {}
    for key in ("disk", "kernel", "initrd"):
        name = manifest.get(key)
        if not isinstance(name, str) or "/" in name or not name:
            problems.append(f"manifest key {key!r} is missing or not a plain file name")
            continue
        paths[key] = d / name
        if not is_file(paths[key]):
            problems.append(f"{paths[key]} is missing")
    cmdline = manifest.get("cmdline")
    if not isinstance(cmdline, str) or not cmdline:
        problems.append("manifest key 'cmdline' is missing")
    if problems or not isinstance(cmdline, str):
        raise ConfigError(f"base image in {d} is incomplete: " + "; ".join(problems) + f" {_HINT}")
    sizes = object_at(manifest, "sizes")
    virtual = sizes.get("virtual_bytes")
    return BaseImage(
        dir=d,
        disk=paths["disk"],
        kernel=paths["kernel"],
        initrd=paths["initrd"],
        cmdline=cmdline,
        user=str(manifest.get("user") or JOB_USER),
        builds_dir=str(manifest.get("builds_dir") or BUILDS_DIR),
        cache_dir=str(manifest.get("cache_dir") or CACHE_DIR),
        virtual_bytes=virtual if isinstance(virtual, int) and virtual > 0 else 0,
        manifest=manifest,
    )


def config_disagreements(image: BaseImage, user: str, builds_dir: str, cache_dir: str) -> list[str]:
    """Where the config's vm.user / builds_dir / cache_dir differ from what the image was built
    with: a job would log in as a user that does not exist, or write where it may not."""
    return [
        f"vm.{key} = {have!r}, but the image in {image.dir} was built with {want!r}"
        for key, have, want in (
            ("user", user, image.user),
            ("builds_dir", builds_dir, image.builds_dir),
            ("cache_dir", cache_dir, image.cache_dir),
        )
        if have != want
    ]
