"""Flags as data: each command declares its flags as a list of :class:`Flag` and a ``run(args)`` function
(a :class:`Command`); the parser is built from the declarations, and so are the flags of a ``--config``
file (:func:`config_flags`). The value parsers (``positive_int``, ...) give argparse's one-line errors."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import COMPILE_MIN_TOKENS, DEFAULT_NORMALIZE
from .common import CLIError


@dataclass(frozen=True)
class Flag:
    """One command-line flag: the keyword arguments of ``ArgumentParser.add_argument`` (None: argparse's own
    default). ``--help`` appends "(default: X)" to the help unless it already says "default", the default
    is None or the flag is required."""

    name: str
    help: str
    default: Any = None
    type: Callable[[str], Any] | None = None
    choices: Any = None
    action: Any = None  # "store_true", "append", "store_const", argparse.BooleanOptionalAction
    nargs: Any = None
    const: Any = None
    dest: str | None = None
    metavar: str | None = None
    required: bool = False

    @property
    def key(self) -> str:
        """The destination (the key of a --config file): the name with underscores, unless ``dest`` says otherwise."""
        return self.dest or self.name[2:].replace("-", "_")

    def shown_help(self) -> str:
        if "default" in self.help or self.default is None or self.required:
            return self.help
        return f"{self.help} (default: %(default)s)"

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        kwargs = {"help": self.shown_help(), "default": self.default, "required": self.required or None, "type": self.type,
                  "choices": self.choices, "action": self.action, "nargs": self.nargs, "const": self.const,
                  "dest": self.dest, "metavar": self.metavar}
        parser.add_argument(self.name, **{key: value for key, value in kwargs.items() if value is not None})


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, its one-line help, its flags, and ``run(args)``. ``defaults`` are values the
    command's arguments carry without flags (``demo``'s model and corpus: the cache configuration's)."""

    name: str
    help: str
    flags: list[Flag]
    run: Callable
    defaults: dict = field(default_factory=dict)

    def flag(self, key: str) -> Flag | None:
        """The first flag of a destination (--compile, not --no-compile)."""
        return next((f for f in self.flags if f.key == key), None)

    def add_to(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        for flag in self.flags:
            flag.add_to(parser)
        parser.set_defaults(**self.defaults, func=self.run)
        return parser

    def parse(self, argv: list[str], prog: str = "grass-attribute") -> argparse.Namespace:
        """This command's arguments alone (the command line without the command's name)."""
        parser = self.add_to(argparse.ArgumentParser(prog=f"{prog} {self.name}", description=self.help))
        return parser.parse_args(argv)


def config_flags(command: Command, values, path: str, given: set[str]) -> list[str]:
    """--config values as command-line flags of ``command`` (so argparse checks their types); keys
    given on the command line are left out (the command line wins); unknown keys are an error."""
    if not isinstance(values, dict):
        raise CLIError(f"--config {path} must hold a JSON object of flag values")
    unknown = sorted(k for k in values if command.flag(k) is None)
    if unknown:
        raise CLIError(f"--config {path}: unknown keys {unknown} for `{command.name}`")
    names = {f.name for f in command.flags}
    flags: list[str] = []
    for key, value in values.items():
        if key in given:
            continue
        spec = command.flag(key)
        flag, negative = spec.name, f"--no-{spec.name[2:]}"
        if isinstance(value, bool) and negative in names:  # --compile / --no-compile
            flags.append(flag if value else negative)
        elif spec.action is argparse.BooleanOptionalAction:
            if not isinstance(value, bool):
                raise CLIError(f"--config {path}: {key} must be true or false, got {value!r}")
            flags.append(flag if value else negative)
        elif spec.nargs in ("+", "*") or spec.action == "append":
            items = value if isinstance(value, list) else [value]
            if not items or any(isinstance(v, (dict, list, bool)) or v is None for v in items):
                raise CLIError(f"--config {path}: {key} must be a string or a list of strings, got {value!r}")
            flags += [flag, *map(str, items)] if spec.nargs in ("+", "*") else [x for v in items for x in (flag, str(v))]
        else:
            if isinstance(value, (dict, list, bool)) or value is None:
                raise CLIError(f"--config {path}: {key} must be a single value, got {value!r}")
            if spec.choices is not None and str(value) not in spec.choices:
                raise CLIError(f"--config {path}: {key} must be one of {list(spec.choices)}, got {value!r}")
            flags += [flag, str(value)]
    return flags


def _number(text: str, convert, ok, what: str, bad: str | None = None):
    """``convert(text)`` if ``ok`` of it, else argparse's error "must be <what>" (``bad``: the wording for a
    value that converts but is out of range)."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {bad or what}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive int")


def nonnegative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an int >= 0")


def max_length(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (a target token needs a token before it), got {value}")
    return value


def fraction(text: str) -> float:
    return _number(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]", "in (0, 1]")


def finite_float(text: str) -> float:
    return _number(text, float, math.isfinite, "a finite number")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < float("inf"), "a number > 0", "a finite number > 0")


def nonnegative_float(text: str) -> float:
    return _number(text, float, lambda v: v >= 0 and v != float("inf"), "a number >= 0", "a finite number >= 0")


def damping(text: str) -> float | str:
    """``--damping``: a number >= 0 (absolute) or '<factor>*mean' (relative to each block's mean eigenvalue)."""
    from ...fim import check_damping

    try:
        return check_damping(text if "*" in text else float(text), "the damping")
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 or '<factor>*mean' (e.g. 0.005*mean), got {text!r}"
                                         f"{'' if 'could not convert' in str(err) else f' ({err})'}") from None


def task_weight(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)", "in [0, 1)")


CANDIDATE_SOURCES = ("bm25", "index")


def candidates(text: str):
    """``attribute --candidates``: a positive int (with --index: the ANN index's candidates per query) or the
    sources of a two-stage ranking, comma-separated (bm25, index or bm25,index) -> a tuple of them."""
    if text.strip().lstrip("+-").isdigit():
        return positive_int(text)
    sources = tuple(s.strip() for s in text.split(","))
    if not all(s in CANDIDATE_SOURCES for s in sources) or len(set(sources)) != len(sources):
        raise argparse.ArgumentTypeError(f"must be a positive int (with --index) or candidate sources among "
                                         f"{', '.join(CANDIDATE_SOURCES)} separated by commas (e.g. bm25,index), got {text!r}")
    return sources


def nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def limit(text: str):
    if str(text).lower() == "all":
        return None
    return _number(text, int, lambda v: v >= 1, "a positive int or 'all'")


# Flags that several commands share, declared once.
STORE_HELP = "the store folder (the demo writes its store to out/llm/store)"
STORE = Flag("--store", STORE_HELP, required=True)
FSDP = Flag("--fsdp", "under torchrun: shard the model across the ranks with FSDP2 (fully_shard on each transformer "
            "block, then the root): once sharded each rank holds 1/world of the weights on its device (every rank "
            "loads the whole model into host memory first); the gradients and scores equal an unsharded run's "
            "(README: sharded models)", default=False, action="store_true")
COMPILE = [
    Flag("--compile", "torch.compile the cache step: auto (default) compiles when the corpus has at least "
                      f"{COMPILE_MIN_TOKENS['bfloat16']:,} real tokens to compute under bfloat16 autocast, "
                      f"{COMPILE_MIN_TOKENS['none']:,} in float32, where one compile pays for itself; --compile (= on) "
                      "forces it; regional: compile one decoder block, shared by every block, and run the rest eagerly "
                      "(seconds to compile instead of minutes)",
         default="auto", nargs="?", const="on", choices=["auto", "on", "off", "regional"]),
    Flag("--no-compile", "run the cache step eagerly (--compile off; default: auto)", dest="compile", action="store_const",
         const="off"),
]
QUERY_SET = [  # the query (or target) set of `attribute` and `select`
    Flag("--task", "an lm-eval task as the query/target set (default: none)"),
    Flag("--include-path", "folder of local lm-eval task YAMLs (default: none)"),
    Flag("--query-limit", "--task: examples to take (default: all)", type=positive_int),
]
NORMALIZE = Flag("--normalize", "IF on unit-normalized gradients, q^T (F + damping I)^-1 g / (|q| |g|), so that no "
                                "high-norm document tops every query (default: raw IF scores, which traced the planted facts "
                                "as well or better)", default=DEFAULT_NORMALIZE, action=argparse.BooleanOptionalAction)
TASK_WEIGHT = Flag("--task-weight", "--preconditioner mixed: the query set's share w in [0, 1) of the curvature, (1 - w) "
                                    "F_train + w F_query per block, so directions every query shares (a prompt template) "
                                    "weigh less; 0 is the FIM (default: none; required with mixed)", type=task_weight)
