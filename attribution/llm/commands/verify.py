"""``grass-attribute verify``: check every file of a store against its recorded checksums."""
from __future__ import annotations

import json
from pathlib import Path

from ...store import CorruptStoreError, StoreError, open_store
from ..config import CLI_JSON
from . import flags as f
from .common import load_store


def run(args):
    """Check every file of a store against its checksums (and a grass-attribute store's corpus and
    configuration against each other); exit status 1 on any problem."""
    try:
        report = open_store(args.store).verify()
    except CorruptStoreError as err:  # the manifest: nothing else can be read without it
        report = {"ok": False, "store": str(args.store), "problems": [str(err)]}
    if (Path(args.store) / CLI_JSON).is_file():
        try:
            load_store(args.store)
        except (StoreError, ValueError) as err:
            if str(err) not in report["problems"]:
                report["problems"].append(str(err))
        report["ok"] = not report["problems"]
    print(json.dumps(report, indent=1))
    if not report["ok"]:
        raise SystemExit(1)
    return report


COMMAND = f.Command("verify", "check every file of a store against its recorded checksums", [f.STORE], run)
