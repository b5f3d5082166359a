"""What every command line shares: absl flags, ml_collections config overrides, subcommands and quiet logs.

A program defines its flags inside its `main(argv)` under `flag_scope()` (so that it can run more than once in one
process, e.g. from tests), takes its config from a config file (`define_config_file`: `--config=path.py[:arg]`)
or from a run's saved config (`define_run_config`: the run named by `--workdir`), and parses with `parse`:

    with cli.flag_scope():
        workdir, config = cli.define_run_config(argv)
        output = flags.DEFINE_string("output", None, "where the result goes")
        command = cli.parse(argv, commands=("benchmark",), required=("workdir", "output"))

Either way every field can be overridden with `--config.FIELD=VALUE`; the config is locked, and a misspelt field
stops the program before any work with the field named and the closest existing one suggested. `run(main)` is
the `python -m` / console-script entry: a usage error prints one line and exits with code 2.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
UsageError = app.UsageError
USAGE_EXIT_CODE = 2

# Names of the flags defined by define_config_file in the current flag_scope.
_CONFIG_FILE_FLAGS: set[str] = set()


# ---------------------------------------------------------------- flags


def _argv(argv: Sequence[str] | None) -> list[str]:
    """[program, *args]: absl's convention, from sys.argv when argv is None (argv excludes the program)."""
    return [sys.argv[0] if sys.argv else "jepa", *(sys.argv[1:] if argv is None else argv)]


@contextlib.contextmanager
def flag_scope() -> Iterator[None]:
    """Flags defined inside are removed on exit and the rest unparsed, so a command line can be parsed again."""
    app.define_help_flags()
    before = set(FLAGS)
    try:
        yield
    finally:
        _CONFIG_FILE_FLAGS.clear()
        for name in set(FLAGS) - before:
            delattr(FLAGS, name)
        FLAGS.unparse_flags()


def flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of `--name=V` or `--name V` in argv (the last one wins, as in absl), before any `--`."""
    value = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def check_overrides(config: ml_collections.ConfigDict, argv: Sequence[str], name: str = "config") -> None:
    """Raises UsageError naming the first `--config.FIELD` of argv that the config does not have, with the
    closest existing field."""
    for arg in argv:
        if arg == "--":
            break
        match = re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
        if not match:
            continue
        node, parts = config, match.group(1).split(".")
        for i, key in enumerate(parts):
            where = ".".join([name, *parts[:i]])
            if not isinstance(node, ml_collections.ConfigDict):
                raise UsageError(f"--{name}.{match.group(1)}: {where} is a value, not a group of fields")
            if key not in node:
                close = difflib.get_close_matches(key, [str(k) for k in node.keys()], n=1)
                hint = f"; did you mean --{where}.{close[0]}?" if close else ""
                raise UsageError(f"--{name}.{match.group(1)}: {where} has no field {key!r}{hint}")
            node = node[key]


def bundled_configs() -> str | None:
    """The folder of the configs shipped with the package (`jepa.configs`; configs/ of a checkout)."""
    try:
        spec = importlib.util.find_spec("jepa.configs")
    except ImportError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    return checkout if os.path.isdir(checkout) else None


def resolve_config_path(value: str) -> str:
    """`path.py[:arg]` unchanged when the file exists; else a shipped config of that name (`quickstart`,
    `quickstart.py` or `configs/quickstart.py`, with the same `:arg`), so the README's commands work from any
    directory after a non-editable install."""
    path, sep, arg = value.partition(":")
    folder = bundled_configs()
    if os.path.exists(path) or folder is None or os.path.dirname(path) not in ("", "configs"):
        return value
    name = os.path.basename(path)
    candidate = os.path.join(folder, name if name.endswith(".py") else f"{name}.py")
    return f"{candidate}{sep}{arg}" if os.path.isfile(candidate) else value


def define_config_file(argv: Sequence[str] | None, help_string: str = "experiment config file "
                       "(path.py[:arg]); override fields with --config.FIELD=VALUE") -> flags.FlagHolder:
    """`--config=path.py[:arg]`, locked, with `--config.FIELD=VALUE` overrides; None when not given."""
    _CONFIG_FILE_FLAGS.add("config")
    return config_flags.DEFINE_config_file("config", None, help_string, lock_config=True, sys_argv=_argv(argv))


def define_run_config(argv: Sequence[str] | None, workdir_help: str = "a jepa.train workdir (config.json "
                      "and checkpoints)") -> tuple[flags.FlagHolder, flags.FlagHolder]:
    """(`--workdir`, `--config`): the config is the saved config of the run in `--workdir` (today's defaults
    without one, so that `--helpfull` works anywhere), with `--config.FIELD=VALUE` overrides."""
    from jepa import config as config_lib
    from jepa import runs
    args = _argv(argv)
    workdir = flag_value(args[1:], "workdir")
    try:
        config = runs.load_config(workdir) if workdir else config_lib.base_config()
    except (OSError, ValueError) as e:
        raise UsageError(f"--workdir={workdir}: {e}") from None
    check_overrides(config, args[1:])
    holder = flags.DEFINE_string("workdir", None, workdir_help)
    config_holder = config_flags.DEFINE_config_dict(
        "config", config, "the run's saved config; override fields with --config.FIELD=VALUE", lock_config=True,
        sys_argv=args)
    return holder, config_holder


def parse(argv: Sequence[str] | None, *, commands: Sequence[str] = (), command_required: bool = False,
          required: Sequence[str] = ()) -> str | None:
    """Parses argv into absl's FLAGS (help flags exit here) and sets up logging; returns the subcommand (one of
    `commands`, or None). Raises UsageError for unknown flags, misspelt config fields, stray arguments and
    missing `required` flags."""
    args = _argv(argv)
    if "config" in _CONFIG_FILE_FLAGS and "config" in FLAGS:
        args = [f"--config={resolve_config_path(a.split('=', 1)[1])}" if a.startswith("--config=") else a
                for a in args]
        path = flag_value(args[1:], "config")
        if path:  # misspelt overrides fail with the field named, before config_flags applies them
            try:
                config = FLAGS["config"].parser.parse(path)
                config.keys()  # config_flags defers a failure to load the file to the first access
            except Exception as e:  # noqa: BLE001 - any failure to load the file is the user's to fix
                raise UsageError(f"--config={path}: {e}") from None
            check_overrides(config, args[1:])
    try:
        rest = FLAGS(args)[1:]
    except flags.Error as e:
        raise UsageError(str(e)) from None
    command = None
    if commands and rest and rest[0] in commands:
        command = rest.pop(0)
    if rest:
        known = f" (commands: {', '.join(commands)})" if commands else ""
        raise UsageError(f"unexpected argument {rest[0]!r}{known}")
    if command_required and command is None:
        raise UsageError(f"give a command: {' | '.join(commands)}")
    missing = [name for name in required if FLAGS[name].value in (None, "")]
    if missing:
        raise UsageError(", ".join(f"--{m}" for m in missing) + " required")
    setup_logging(FLAGS["verbosity"].value if "verbosity" in FLAGS else 0)
    return command


def run(main: Callable[[Sequence[str] | None], Any], doc: str | None = None) -> None:
    """Entry of `python -m` and the console scripts: main(sys.argv[1:]); a UsageError prints one line and exits
    with USAGE_EXIT_CODE; an integer result is the exit code."""
    if doc and "__main__" in sys.modules:  # what --helpfull prints above the flags (console scripts have none)
        sys.modules["__main__"].__doc__ = doc
    try:
        result = main(None)
    except UsageError as e:
        print(f"error: {e}\nPass --helpfull to see help on flags.", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
    except Exception as e:
        if not isinstance(e, _explained_errors()):
            raise
        # These messages already name the input and what is wrong; a traceback would bury them.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE if isinstance(e, ValueError) else 1)
    if isinstance(result, int) and not isinstance(result, bool):
        sys.exit(result)


def _explained_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is the whole story: a bad config value, a locked workdir, a damaged checkpoint, a
    diverged run (its step and last good checkpoint named)."""
    from jepa import checkpoint, config, workdir
    errors = [config.ConfigError, workdir.WorkdirLockedError, checkpoint.CheckpointDamagedError,
              checkpoint.CheckpointMismatchError]
    for name in ("jepa.train", "__main__"):  # `python -m jepa.train` runs the trainer as __main__
        error = getattr(sys.modules.get(name), "NonFiniteLossError", None)
        if isinstance(error, type):
            errors.append(error)
    return tuple(errors)


# ---------------------------------------------------------------- logs


class _Quiet(logging.Filter):
    """Our records from INFO up, anyone's errors; library INFO and warnings (Orbax, TFDS, JAX's platform probing,
    absl, py.warnings) only with --verbosity=1. Ours: jepa's loggers, and the root logger's records when they
    come from jepa's files or the program's own script (absl's flags log through the root logger too)."""

    def __init__(self):
        super().__init__()
        main = getattr(sys.modules.get("__main__"), "__file__", None)
        self.dirs = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
                     *([os.path.dirname(os.path.abspath(main)) + os.sep] if main and os.path.isfile(main) else []))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or record.name == "jepa" or record.name.startswith("jepa."):
            return True
        return record.name in ("root", "__main__") and os.path.abspath(record.pathname).startswith(self.dirs)


class _Format(logging.Formatter):
    """`HH:MM:SS message`; warnings and errors say so; with verbose, the logger's name too."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        where = f"{record.name}: " if self.verbose else ""
        return f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {level}{where}{text}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (tests and notebooks replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        del value


def setup_logging(verbosity: int = 0) -> None:
    """One stderr handler on the root logger (replacing any). verbosity 0: our progress lines and warnings,
    errors from anyone; >= 1: every library's INFO lines and warnings too (Python warnings included); >= 2:
    DEBUG."""
    root = logging.getLogger()
    for handler in list(root.handlers):  # e.g. the default one that logging.info() before any setup installs
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_Format(verbose=verbosity >= 1))
    if verbosity < 1:
        handler.addFilter(_Quiet())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
    # Orbax and TFDS log through absl's logger, whose level absl's --verbosity flag sets on its own scale.
    logging.getLogger("absl").setLevel(logging.NOTSET)
    # Library warnings (e.g. Orbax's UserWarnings) go through the filter above; released first, so that the hook
    # is installed again if something replaced warnings.showwarning since an earlier call.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
