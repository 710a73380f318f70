"""The subcommands of ``grass-attribute``, one module each: its flags as data (:class:`.flags.Flag`) and its
``run(args)``, in a :class:`.flags.Command` named ``COMMAND``. :mod:`attribution.llm.cli` builds the parser
from :data:`COMMANDS` (in --help's order)."""
from __future__ import annotations

from . import attribute, bench, cache, demo, index, select, verify

COMMANDS = (cache.COMMAND, demo.COMMAND, attribute.COMMAND, select.COMMAND, index.COMMAND, verify.COMMAND, bench.COMMAND)
