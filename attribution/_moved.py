"""Modules that moved in the second architecture step keep their old import names.

``import attribution.compress`` (or ``from attribution import facts``) returns the very module object that
its new name holds, so isinstance checks, monkeypatching and pickles agree. New code uses the new names;
this table is the one place that maps them.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "attribution.compress": "attribution.compression",
    "attribution.parallel": "attribution.collectives",
    "attribution.distributed": "attribution.process_group",
    "attribution.lds": "attribution.evaluation.lds",
    "attribution.lm_lds": "attribution.evaluation.lm_lds",
    "attribution.metrics": "attribution.evaluation.metrics",
    "attribution.facts": "attribution.evaluation.facts",
    "attribution.fidelity": "attribution.evaluation.fidelity",
    "attribution.examples": "attribution.evaluation.examples",
    "attribution.manifest": "attribution.store.manifest",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old name in :data:`MOVED` to the module under its new name."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass  # already executed under its new name


def install() -> None:
    """Put the finder on sys.meta_path once (idempotent across reloads)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())  # before any other finder (an editable install's would find a stale copy)
