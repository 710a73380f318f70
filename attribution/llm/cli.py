"""``grass-attribute``: attribute a causal LM's outputs to training documents with FactGraSS.

    grass-attribute demo                                        # the main job; writes out/llm/ (its store: out/llm/store)
    grass-attribute attribute --store out/llm/store --prompt "The clockmaker who founded the harbour town of Velmora was"
    grass-attribute cache --store out/docs                      # your own store: SmolLM2-135M + 96 Python-docs paragraphs
    grass-attribute cache --store out/docs --limit all          # grows it: only the new paragraphs are cached
    grass-attribute attribute --store out/docs --prompt "To improve data privacy,"
    grass-attribute select --store out/docs --target target.jsonl --fraction 0.1 --out selected.jsonl
    grass-attribute bench --out bench.json
    grass-attribute index --store out/docs [--factory "IVF4096,PQ64"]   # ANN index (the `faiss` extra)
    torchrun --nproc_per_node 2 -m attribution.cli cache --store out/docs  # every rank its share (gloo/nccl)

Every flag can also come from ``--config file.json`` (keys = flag names with underscores). ``cache``
records its configuration in the store (cli.json), so later commands need only ``--store``; an
interrupted ``cache`` resumes where it stopped, and a larger ``--limit`` (or a corpus file with more
documents) grows the store: the cached rows stay, the new documents are appended.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .. import llm, process_group
from ..attributor import Attributor
from ..store import read_json
from .commands import COMMANDS
from .commands import attribute as _attribute
from .commands import bench as _bench
from .commands import cache as _cache
from .commands import demo as _demo
from .commands import index as _index
from .commands import select as _select
from .commands import verify as _verify
from .commands.attribute import attribute_queries
from .commands.cache import compile_decision
from .commands.common import EXPECTED_ERRORS, CLIError
from .commands.flags import NORMALIZE, STORE_HELP, config_flags
from .config import CACHE_KEYS, COMPILE_MIN_TOKENS, DEFAULT_AUTOCAST, DEFAULT_NORMALIZE, GROWABLE_KEYS, CacheConfig

# The names this module had before the commands moved to attribution.llm.commands (code and tests import them).
cmd_cache, cmd_attribute, cmd_select, cmd_verify, cmd_index, cmd_demo, cmd_bench = (
    _cache.run, _attribute.run, _select.run, _verify.run, _index.run, _demo.run, _bench.run)
NORMALIZE_HELP = NORMALIZE.help
__all__ = ["Attributor", "CACHE_KEYS", "CLIError", "COMMANDS", "COMPILE_MIN_TOKENS", "CacheConfig", "DEFAULT_AUTOCAST",
           "DEFAULT_NORMALIZE", "EXPECTED_ERRORS", "GROWABLE_KEYS", "NORMALIZE_HELP", "STORE_HELP", "attribute_queries",
           "build_parser", "cmd_attribute", "cmd_bench", "cmd_cache", "cmd_demo", "cmd_index", "cmd_select", "cmd_verify",
           "compile_decision", "llm", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command, built from the commands' flag declarations (attribution.llm.commands)."""
    parser = argparse.ArgumentParser(prog="grass-attribute", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON file with flag values (flags given on the command line win; default: none)")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_to(sub.add_parser(command.name, help=command.help, description=command.help,
                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def _with_config(parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace) -> argparse.Namespace:
    """The arguments with the --config file's values for the flags that the command line does not give."""
    path = Path(args.config)
    if not path.is_file():
        raise CLIError(f"--config file not found: {args.config}")
    own = argv[argv.index(args.command) + 1:]
    given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in own if a.startswith("--")}
    given |= {g[3:] for g in given if g.startswith("no_")}
    values = read_json(path, "--config file")
    command = next(c for c in COMMANDS if c.name == args.command)
    return parser.parse_args([args.command, *config_flags(command, values, args.config, given), *own])


def run(argv=None):
    """Parse and run one subcommand; returns its result (main() is the console entry point). Under
    torchrun (WORLD_SIZE > 1) the process group is initialized from the environment first (gloo on
    CPU, nccl with one GPU per LOCAL_RANK) and every rank runs the command on its share."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        args = _with_config(parser, argv, args)
    process_group.init_from_environment()
    try:
        return args.func(args)
    except llm.UsageError as err:
        raise CLIError(str(err)) from None


def main(argv=None) -> int:
    """Console entry point: expected errors (bad input, a store that cannot serve the request) are
    printed as one line with exit status 2; anything else keeps its traceback. Under torchrun the
    process group this call started is destroyed at the end, and a program run (``argv`` None) then exits at
    once (:func:`process_group.exit_now`): torch's gloo can abort a process in the interpreter's shutdown after
    a finished run."""
    dist = torch.distributed
    started = dist.is_available() and dist.is_initialized()
    status, destroyed = 0, False
    try:
        run(argv)
    except CLIError as err:
        print(err, file=sys.stderr)
        status = 2
    except (*EXPECTED_ERRORS, process_group.RankFailed) as err:
        if isinstance(err, process_group.RankFailed) and not err.is_a(CLIError, *EXPECTED_ERRORS):
            raise
        print(f"grass-attribute: error: {err}", file=sys.stderr)
        status = 2
    finally:
        if not started and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
            destroyed = True
    if destroyed and argv is None:
        process_group.exit_now(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
