"""The `rsjax` command line: one console script, a subcommand per command.

    rsjax train --config fusion:demo --workdir work/demo
    rsjax evaluate --workdir work/demo
    rsjax --help                      # every subcommand
    rsjax train --help                # what it does, every option with its default

Every subcommand is also `python -m <its module>` (`python -m rsjax.train`),
with the same options. One flag style everywhere: `--snake_case` (as absl and
ml_collections write them; `--kebab-case` spellings are accepted too), and
config overrides as `--config.key=value`.

A command module provides `add_arguments(parser)` and `run(args)`; this module
builds the parser, loads `--config` (name or file, then the overrides), runs
the command under `report_errors`, and prints user errors as one
`error: ...` line with exit status 2 (`--verbose` adds the traceback).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import textwrap
from typing import Any, Callable, Optional, Sequence

from rsjax.errors import DISK_FULL_MARKERS, RunFailed, UserError, disk_full

# name -> (module, one-line summary). Order is the order of `rsjax --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "scenes": ("rsjax.commands.scenes", "write synthetic multi-source scenes as GeoTIFFs"),
    "export_ee": ("rsjax.commands.export_ee", "export scenes from Earth Engine as ingestion's GeoTIFFs"),
    "ingest": ("rsjax.commands.ingest", "check your own exports: validate, register, tile (dry run)"),
    "build": ("rsjax.build_dataset", "build the rs_multisource TFDS dataset"),
    "train": ("rsjax.train", "train a model: RS-SPADE, pix2pix, the flow model, RS-UNet, "
                             "DSen2-CR or UnCRtainTS"),
    "evaluate": ("rsjax.evaluate", "score a checkpoint on a split"),
    "synthesize": ("rsjax.synthesize", "generated optical images for every tile of a split"),
    "predict": ("rsjax.commands.predict", "whole-scene prediction to a georeferenced GeoTIFF"),
    "report": ("rsjax.html_report", "an HTML page of one run or a folder of runs"),
    "experiments": ("rsjax.experiments", "the paper's experiments (Tables 1-3) and cloud removal"),
    "couplings": ("rsjax.commands.couplings", "how much each source tells about the optical bands"),
    "params": ("rsjax.commands.params", "parameter table of the models"),
    "bench": ("rsjax.bench", "benchmarks as JSON: train steps, input pipeline, ingest, build, "
                             "predict, layers"),
    "tpu": ("rsjax.launch.tpu", "Cloud TPU VM: create, install, run, logs, delete"),
}
# Listed apart in `rsjax --help`, after the commands a user works with.
DEVELOPER_COMMANDS = ("params", "bench")
# Old command names that still work for one release, with a line saying the new one.
RENAMED: dict[str, tuple[str, ...]] = {
    "bench_ingest": ("bench", "ingest"), "bench_build": ("bench", "build"),
    "bench_pipeline": ("bench", "pipeline"), "bench_predict": ("bench", "predict"),
    "bench_layers": ("bench", "layers"),
}

log = logging.getLogger("rsjax")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and appends every option's default,
    unless the help already says it ("(default: the config's)") or there is
    none to say (None, an on/off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default is None or action.nargs == 0
                or action.default is argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def normalize_flags(argv: Sequence[str]) -> list[str]:
    """`--tile-size=64` -> `--tile_size=64`: one flag style, the other accepted.

    Config overrides (`--config.a.b`) and values are left alone."""
    out = []
    for token in argv:
        if token.startswith("--") and not token.startswith("--config.") and len(token) > 2:
            name, sep, value = token[2:].partition("=")
            token = "--" + name.replace("-", "_") + sep + value
        out.append(token)
    return out


def note_renamed(old: str, new: str) -> None:
    """The one line an old name of the previous release prints before it runs as `new`."""
    print(f"note: {old} is now {new}; the old form goes in the next release.", file=sys.stderr)


def rename_options(argv: Sequence[str], renamed: dict[str, Optional[str]], prog: str) -> list[str]:
    """Old option names still work for one release: each becomes its new name
    (None: dropped, what it asked for is now the default), with one note line."""
    out = []
    for token in argv:
        name, sep, value = token.partition("=")
        if name in renamed:
            new = renamed[name]
            note_renamed(name, f"`{prog} {new}`" if new else "the default")
            if new is None:
                continue
            token = new + sep + value
        out.append(token)
    return out


def description(doc: Optional[str]) -> str:
    return textwrap.dedent(doc or "").strip()


def make_parser(prog: str, doc: Optional[str], add_arguments: Callable) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description(doc),
                                     formatter_class=HelpFormatter, allow_abbrev=False)
    add_arguments(parser)
    add_common_arguments(parser)
    return parser


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show tracebacks and the libraries' INFO logs")


def add_config_argument(parser: argparse.ArgumentParser, *, required: bool,
                        help: str = "config name or .py file, with an optional ':arg' "
                                    "(e.g. fusion:demo,sources=lulc+s1); override fields "
                                    "with --config.KEY=VALUE") -> None:
    """`--config SPEC`; overrides `--config.a.b=v` are collected apart (see `parse`)."""
    parser.add_argument("--config", required=required, default=None, metavar="SPEC", help=help)


# Argument types: a bad value is argparse's one-line `error: argument --x: ...`, exit 2.
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive integer")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be 0 or more")
    return value


def int_list(text: str) -> list[int]:
    """'1,4' -> [1, 4]; every item a positive integer."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 1,4") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated positive integers, e.g. 1,4")
    return values


def nonnegative_int_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; every item an integer of 0 or more."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers of 0 or more, "
                                         "e.g. 0,1,2")
    return values


def name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """A type for 'a,b' where every item is one of `choices`."""
    def parse_names(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"{text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}; "
                f"choose from {','.join(choices)}")
        return names
    parse_names.__name__ = "name list"
    return parse_names


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parses `argv`; `--config.*` overrides land in `args.config_overrides`."""
    from rsjax.config_loader import split_override_args

    rest, overrides = split_override_args(normalize_flags(argv))
    if rest and rest[-1] == "--":       # `... -- --config.a=1`: a `--` that only led overrides
        rest = rest[:-1]
    args = parser.parse_args(rest)
    args.config_overrides = overrides
    if overrides and "config" not in vars(args):
        parser.error(f"--config.{overrides[0]}: this command takes no config overrides "
                     "(its --help lists its options)")
    return args


def load_config_arg(args: argparse.Namespace, workdir: Optional[str] = None):
    """The command's config: `--config` if given, else the workdir's saved
    config.json (when `workdir` is given), with the overrides applied. None
    when neither is there."""
    from rsjax import config_loader

    if getattr(args, "config", None):
        return config_loader.load_config(args.config, args.config_overrides)
    if workdir is not None:
        return config_loader.config_from_workdir(workdir, args.config_overrides)
    if args.config_overrides:
        raise UserError("--config.KEY=VALUE overrides need --config.")
    return None


def print_json(result: Any) -> None:
    if result is not None:
        print(json.dumps(result, indent=2, default=str), flush=True)


def report_errors(fn: Callable[[], Any], verbose: bool) -> int:
    """Runs `fn`; returns the exit status: 0, 2 for user errors, 1 for failed runs."""
    try:
        status = fn()
    except UserError as err:
        if verbose:
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except RunFailed as err:
        if verbose:
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # pylint: disable=broad-except
        full = disk_full(err)
        if full is None or verbose:
            raise
        print(f"error: {full}", file=sys.stderr, flush=True)
        return 1
    except BrokenPipeError:            # `rsjax ... | head`: the reader left; no traceback
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # Python's own advice
        return 141
    return int(status) if isinstance(status, int) and not isinstance(status, bool) else 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is logged, so commands
    run in-process (tests, notebooks) log where their caller captures."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


# Library warnings that say nothing useful to a user of rsjax (shown with --verbose):
# TFDS about a dataset folder whose build is under way or was interrupted (rsjax
# cleans those up itself), Orbax about a checkpoint save that a final save waited for.
NOISE = ("Variant folder ", "Waiting for previous save to complete")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISE)


# A full disk under an asynchronous checkpoint fails in every thread Orbax writes
# with: each logs the error with its traceback, and tensorstore's late callbacks
# print "Event loop is closed" tracebacks by the dozen (744 in one failed run).
# The command ends with one `error:` line naming the path (`disk_full`); before it,
# one warning line says where, and the rest is dropped (shown with --verbose).
_FULL_MARKERS = DISK_FULL_MARKERS + ("RESOURCE_EXHAUSTED",)


class _OneDiskFullError(logging.Filter):
    """Lets the first disk-full error of a library through as one line, drops the others."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not _mentions_full_disk(record):
            return True
        if self.seen:
            return False
        self.seen = True
        record.msg, record.args = _first_line(record.getMessage()), ()
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _mentions_full_disk(record: logging.LogRecord) -> bool:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        text += f" {record.exc_info[1]}"
    return any(marker in text for marker in _FULL_MARKERS)


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= 400 else line[:400] + " ..."


def _quiet_late_callbacks() -> None:
    """Drops the 'Event loop is closed' tracebacks of callbacks that outlive a failed
    save's event loop (printed through sys.excepthook from tensorstore's threads and
    sys.unraisablehook); every other exception is shown as before."""
    def is_late_callback(exc) -> bool:
        return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"

    previous_excepthook, previous_unraisable = sys.excepthook, sys.unraisablehook
    if getattr(previous_excepthook, "_rsjax_quiet", False):
        return

    def excepthook(kind, value, tb):
        if not is_late_callback(value):
            previous_excepthook(kind, value, tb)

    def unraisablehook(unraisable):
        if not is_late_callback(unraisable.exc_value):
            previous_unraisable(unraisable)

    excepthook._rsjax_quiet = True
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def setup_process(verbose: bool = False) -> None:
    """Logging for people (rsjax's INFO lines, the libraries' warnings), absl
    flags marked parsed (grain's worker processes read them)."""
    from absl import flags
    from absl import logging as absl_logging

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    absl_logger, asyncio_logger = logging.getLogger("absl"), logging.getLogger("asyncio")
    for logger in (absl_logger, asyncio_logger):
        for old in [f for f in logger.filters if isinstance(f, (_DropNoise, _OneDiskFullError))]:
            logger.removeFilter(old)
    if not verbose:
        absl_logger.addFilter(_DropNoise())
        # One filter for both: Orbax's thread errors (absl) and the futures nobody awaited
        # once a save failed (asyncio, "Future exception was never retrieved").
        one_disk_full = _OneDiskFullError()
        for logger in (absl_logger, asyncio_logger):
            logger.addFilter(one_disk_full)
        _quiet_late_callbacks()
    rsjax_log = logging.getLogger("rsjax")
    if not rsjax_log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        rsjax_log.addHandler(handler)
        rsjax_log.propagate = False
    rsjax_log.setLevel(logging.INFO)


def run_command(module, argv: Optional[Sequence[str]], prog: str) -> int:
    """Parses `argv` with the module's arguments and runs it; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser(prog, module.__doc__, module.add_arguments)
    argv = rename_options(normalize_flags(argv), getattr(module, "RENAMED_OPTIONS", {}), prog)
    verbose = "--verbose" in argv
    try:
        args = parse(parser, argv)
    except UserError as err:           # a malformed override
        if verbose:
            raise
        parser.print_usage(sys.stderr)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SystemExit as done:         # argparse: --help (0) or a bad option (2), already printed
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    setup_process(args.verbose)
    return report_errors(lambda: module.run(args), args.verbose)


def command_main(module_name: str) -> Callable[[Optional[Sequence[str]]], int]:
    """`main(argv=None)` for `python -m module_name` (the module's own options)."""
    def main(argv: Optional[Sequence[str]] = None) -> int:
        module = sys.modules[module_name]
        # Under `python -m`, the module is __main__; its spec keeps the real name.
        spec = getattr(module, "__spec__", None)
        prog = f"python -m {spec.name if spec is not None else module_name}"
        return run_command(module, argv, prog)
    return main


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`rsjax SUBCOMMAND ...`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    width = max(len(n) for n in COMMANDS)

    def listing(names):
        return "\n".join(f"  {n.ljust(width)}  {COMMANDS[n][1]}" for n in names)
    users = [n for n in COMMANDS if n not in DEVELOPER_COMMANDS]
    usage = (f"usage: rsjax [--version] SUBCOMMAND [options]\n\n{description(__doc__).splitlines()[0]}"
             f"\n\nsubcommands:\n{listing(users)}\n\nfor developers (model tables, benchmarks):\n"
             f"{listing(DEVELOPER_COMMANDS)}\n\n`rsjax SUBCOMMAND --help` describes each one.")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage)
        return 0 if argv else 2
    if argv[0] == "--version":
        from rsjax import __version__
        print(f"rsjax {__version__}")
        return 0
    name = argv[0].replace("-", "_")
    if name in RENAMED:
        new = RENAMED[name]
        note_renamed(f"`rsjax {argv[0]}`", f"`rsjax {' '.join(new)}`")
        argv, name = [*new, *argv[1:]], new[0]
    if name not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown subcommand '{argv[0]}'.{hint} `rsjax --help` lists them.",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    if hasattr(module, "SUBCOMMANDS"):       # a group: `rsjax experiments report ...`
        return _run_group(name, module, argv[1:])
    return run_command(module, argv[1:], prog=f"rsjax {name}")


def _run_group(group: str, package, argv: Sequence[str]) -> int:
    """`rsjax GROUP NAME ...` for a package that lists `SUBCOMMANDS = {name: (module, summary)}`."""
    commands = package.SUBCOMMANDS
    width = max(len(n) for n in commands)
    listing = "\n".join(f"  {n.ljust(width)}  {summary}" for n, (_, summary) in commands.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: rsjax {group} NAME [options]\n\n{description(package.__doc__)}\n\n"
              f"{group}:\n{listing}")
        return 0 if argv else 2
    default = getattr(package, "DEFAULT_SUBCOMMAND", None)
    if default and argv[0].startswith("-"):        # `rsjax bench --parts ...`: the old form
        note_renamed(f"`rsjax {group} {argv[0]} ...`", f"`rsjax {group} {default} {argv[0]} ...`")
        argv = [default, *argv]
    name = argv[0].replace("-", "_")
    if name not in commands:
        print(f"error: unknown {group} '{argv[0]}'; choose one of {', '.join(commands)}.",
              file=sys.stderr)
        return 2
    module = importlib.import_module(commands[name][0])
    return run_command(module, argv[1:], prog=f"rsjax {group} {name}")


if __name__ == "__main__":
    sys.exit(main())
