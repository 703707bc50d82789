"""The ``vmvault`` command line: global flags, command groups, and error-to-exit-code mapping.

Exit codes: 0 success, 1 the operation failed (message says why and what to do),
2 bad usage or bad config (nothing was done).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from vmvault import __version__

# Command groups, in the order `--help` lists them. Each is imported unconditionally: a
# group that fails to import is a broken install and stops the CLI with its traceback,
# instead of silently dropping its commands.
_COMMAND_GROUPS = (
    "vmvault.scheduler.commands.config",
    "vmvault.scheduler.commands.repo",
    "vmvault.scheduler.commands.copy",
    "vmvault.scheduler.commands.backup",
    "vmvault.scheduler.commands.restore",
    "vmvault.scheduler.commands.serve",
    "vmvault.scheduler.commands.files",
    "vmvault.scheduler.commands.fleet",
    "vmvault.scheduler.commands.notify",
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _global_flags(suppress: bool) -> argparse.ArgumentParser:
    """Flags accepted both before and after the command name."""
    default = argparse.SUPPRESS if suppress else None
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--config",
        metavar="FILE",
        default=default,
        help="fleet config file (default: $VMVAULT_CONFIG, else ./vmvault.yaml)",
    )
    parent.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="machine-readable output on stdout (messages stay on stderr)",
    )
    parent.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS if suppress else 0,
        help="more log output (-vv for debug)",
    )
    return parent


COMMAND_FLAGS = _global_flags(suppress=True)


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every available command group registered."""
    parser = argparse.ArgumentParser(
        prog="vmvault",
        description="Incremental pull-mode backup for QEMU virtual machines.",
        parents=[_global_flags(suppress=False)],
    )
    parser.add_argument("--version", action="version", version=f"vmvault {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _COMMAND_GROUPS:
        module = importlib.import_module(module_name)
        module.register(commands)
    return parser


def add_command(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    name: str,
    help_text: str,
) -> argparse.ArgumentParser:
    """Add one command that also accepts the global flags after its name."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=help_text, description=help_text, parents=[COMMAND_FLAGS]
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vmvault`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Imported once a command runs (``--version`` and ``--help`` exit above): the config
    # model behind these errors loads pydantic, and start-up time is what an operator feels.
    from vmvault.scheduler.cli_context import CliContext
    from vmvault.scheduler.errors import SchedulerError
    from vmvault.scheduler.logs import setup_logging
    from vmvault.storage.errors import StorageError
    from vmvault.worker.config import ConfigError, UnknownDomainError
    from vmvault.worker.errors import WorkerError
    from vmvault.worker.redact import redact
    from vmvault.worker.signals import Terminated, signals_as_exceptions

    setup_logging(args.verbose)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    ctx = CliContext(config_file=args.config, json=args.json, verbose=args.verbose)
    try:
        # SIGTERM (systemctl stop, kill) stops a job through its teardown, as Ctrl-C does.
        with signals_as_exceptions():
            code: int = args.func(args, ctx)
        return code
    # Messages may quote a URL with the broker's password (redis-py, kombu): masked.
    except ConfigError as err:
        for problem in err.problems:
            print(f"vmvault: config: {redact(problem)}", file=sys.stderr)
        return EXIT_USAGE
    except UnknownDomainError as err:
        print(f"vmvault: error: {redact(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    except (StorageError, WorkerError, SchedulerError) as err:
        print(f"vmvault: error: {redact(str(err))}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("vmvault: interrupted", file=sys.stderr)
        return 130
    except Terminated as err:
        print(f"vmvault: {err}; what the job had set up was removed", file=sys.stderr)
        return 128 + err.signum


if __name__ == "__main__":
    sys.exit(main())
