#!/usr/bin/python3
"""A STAND-IN for the `gitlab-runner` binary, for tests only: the real one cannot be installed on
the development host (no GitLab package source), so the vm tests put this script where the
runner's binary would be (`runner.binary`) and the executor ships it into job VMs exactly as it
would ship the real one.

It does what the runner's stage scripts ask of the helper commands, as far as a test can see:
  --version                      prints a version and exits 0 (the stage scripts' guard)
  cache-archiver --file F --path P... [--untracked]   zips the paths (relative to the cwd) into F
                                 through a temp file and a rename, as the real one does
  cache-extractor --file F       unzips F into the cwd; exit 1 if F does not exist
  artifacts-uploader, artifacts-downloader   exit 0 (there is no GitLab to talk to)
Every call prints `gitlab-runner stand-in: <argv>` on stderr first, so the job log records it.
Options it does not use (--timeout, --url, --env-file, ...) are accepted and ignored.
Standalone: it runs inside the VM with the image's python3 and imports nothing of the executor.
"""

from __future__ import annotations

import os
import sys
import tempfile
import zipfile
from typing import Any

VERSION = "17.11.0~standin"


def options(argv: list[str]) -> dict[str, Any]:
    found: dict[str, Any] = {"path": []}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            if not value and name not in ("untracked",) and i + 1 < len(argv):
                i += 1
                value = argv[i]
            if name == "path":
                found["path"].append(value)
            else:
                found[name] = value
        i += 1
    return found


def archive(opts: dict[str, Any]) -> int:
    target = opts["file"]
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=os.path.dirname(target) or ".", prefix="archive_")
    with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w") as zf:
        for top in opts["path"]:
            for root, _, files in os.walk(top):
                for name in files:
                    zf.write(os.path.join(root, name))
            if os.path.isfile(top):
                zf.write(top)
    os.replace(temp, target)
    print(f"Created cache {target}", file=sys.stderr)
    return 0


def extract(opts: dict[str, Any]) -> int:
    source = opts["file"]
    if not os.path.exists(source):
        print(f"{source}: cache not found", file=sys.stderr)
        return 1
    with zipfile.ZipFile(source) as zf:
        zf.extractall(".")
    print(f"Extracted cache {source}", file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    print("gitlab-runner stand-in: " + " ".join(argv), file=sys.stderr)
    if argv[:1] == ["--version"]:
        print(f"Version:      {VERSION}")
        return 0
    command, opts = (argv[0] if argv else ""), options(argv[1:])
    if command == "cache-archiver":
        return archive(opts)
    if command == "cache-extractor":
        return extract(opts)
    if command in ("artifacts-uploader", "artifacts-downloader"):
        return 0
    print(f"gitlab-runner stand-in: {command!r} is not implemented", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
