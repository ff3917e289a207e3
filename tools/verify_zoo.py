#!/usr/bin/env python
"""Check downloaded model-zoo files against the MD5s in configs/model_zoo.yaml.

    python tools/verify_zoo.py ~/model_zoo
    python tools/verify_zoo.py ~/model_zoo --zoo configs/model_zoo.yaml --json zoo.json

Each entry of the zoo is reported as
  OK          the file (by its listed name, or any file with the listed MD5) matches
  MISMATCH    a file of the listed name has another MD5 (a broken or different download)
  MISSING     no such file in DIR (and no file with its MD5)
  NO-MD5      present, but the authors published no MD5 for it (not verifiable)
and files of DIR that match no entry are listed. Exit status 1 when any file
is a MISMATCH, else 0. Files are only hashed, never loaded.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Dict, List

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ZOO = os.path.join(ROOT, "configs", "model_zoo.yaml")
EXTENSIONS = (".pth", ".pth.tar", ".pt", ".tar", ".safetensors")

__all__ = ["md5sum", "load_zoo", "verify", "main"]


def md5sum(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def load_zoo(path: str = DEFAULT_ZOO) -> List[dict]:
    """The ``models`` entries of the zoo file (each with at least ``id`` and ``file``)."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    models = data.get("models")
    if not isinstance(models, list) or not all(isinstance(m, dict) and "file" in m
                                               for m in models):
        raise ValueError(f"{path}: expected a 'models' list of entries with a 'file'")
    return models


def _hash_dir(folder: str) -> Dict[str, str]:
    """name -> MD5 of every checkpoint-like file directly in ``folder``."""
    return {name: md5sum(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
            if name.lower().endswith(EXTENSIONS) and os.path.isfile(os.path.join(folder, name))}


def _status(entry: dict, hashes: Dict[str, str]) -> dict:
    name, expected = entry["file"], (entry.get("md5") or "").lower() or None
    by_md5 = [n for n, h in hashes.items() if expected and h == expected]
    row = {"id": entry.get("id", name), "file": name, "expected_md5": expected}
    if name in hashes:
        row["md5"] = hashes[name]
        row["status"] = ("NO-MD5" if expected is None else
                         "OK" if hashes[name] == expected else "MISMATCH")
        if row["status"] == "MISMATCH" and by_md5:
            row.update(status="OK", found_as=by_md5[0], md5=expected)
    elif by_md5:
        row.update(status="OK", found_as=by_md5[0], md5=expected)
    else:
        row["status"] = "MISSING"
    return row


def verify(folder: str, zoo: str = DEFAULT_ZOO) -> dict:
    """Statuses of every zoo entry and the unknown files of ``folder``."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such directory")
    hashes = _hash_dir(folder)
    rows = [_status(e, hashes) for e in load_zoo(zoo)]
    used = {r.get("found_as", r["file"]) for r in rows if r["status"] != "MISSING"}
    return {"entries": rows, "unknown_files": [n for n in hashes if n not in used]}


def _print(result: dict):
    for r in result["entries"]:
        extra = ""
        if r["status"] == "MISMATCH":
            extra = f"  (md5 {r['md5']}, expected {r['expected_md5']})"
        elif r.get("found_as"):
            extra = f"  (found as {r['found_as']})"
        elif r["status"] == "NO-MD5":
            extra = "  (no MD5 published; md5 " + r["md5"] + ")"
        print(f"{r['status']:<9} {r['file']}{extra}")
    for name in result["unknown_files"]:
        print(f"{'UNKNOWN':<9} {name}  (not in the zoo)")
    counts = {}
    for r in result["entries"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("dir", help="folder with the downloaded checkpoints")
    ap.add_argument("--zoo", default=DEFAULT_ZOO, help="zoo file (default: configs/model_zoo.yaml)")
    ap.add_argument("--json", help="also write the result as JSON here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = verify(args.dir, args.zoo)
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    _print(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if any(r["status"] == "MISMATCH" for r in result["entries"]) else 0


if __name__ == "__main__":
    sys.exit(main())
