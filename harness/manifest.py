"""A folder's checksum manifest: `manifest.json` lists the sha256 of every other file in the folder.

Written last, checked on every load: a cached tiny model, a cached defended model and a SpecDef
release are used only when every file is present with its checksum, so a truncated or corrupted
copy is detected (and rebuilt, or refused) instead of loaded.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, extra: dict) -> None:
    """`manifest.json` with the checksum of every file of `folder` under `files`, plus `extra`."""
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files, **extra}, indent=2, sort_keys=True))


def verify_manifest(folder: Path) -> str | None:
    """None if every file listed in the manifest is present with its checksum, else what is wrong."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest.json ({e})"
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            return f"missing {name}"
        if sha256_file(path) != digest:
            return f"checksum mismatch in {name}"
    return None
