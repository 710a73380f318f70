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
    "attribution.cli": "attribution.llm.cli",
    "attribution.llm_bench": "attribution.llm.bench",
    "attribution.report": "attribution.llm.report",
    "attribution.demo": "attribution.llm.demo",
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

    def get_code(self, fullname):
        """``python -m <old name>`` (runpy asks for the code to run as __main__): run the new module as __main__."""
        return compile(f"import runpy\nrunpy.run_module({MOVED[fullname]!r}, run_name='__main__', alter_sys=True)\n",
                       f"<{fullname}: moved to {MOVED[fullname]}>", "exec")


def install() -> None:
    """Put the finder first on sys.meta_path once (idempotent across reloads): an old name resolves to its new
    module even where another finder still knows a file of that name (an editable install of an older tree)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())
