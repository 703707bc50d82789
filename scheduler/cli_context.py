"""What every CLI handler gets: the parsed flags, the config (loaded on demand) and output."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    # rich and the config model (pydantic) load only when a command needs them: they are
    # most of the CLI's start-up time (bench/cli_bench.py).
    from rich.console import Console

    from vmvault.worker.config import FleetConfig, RepositoryConfig


@dataclass
class CliContext:
    """Per-invocation state.

    Human output (results and messages) goes to stdout so it can be piped; with ``--json``
    stdout carries exactly one JSON document and human messages move to stderr. Errors and
    progress bars always go to stderr.
    """

    config_file: str | None = None
    json: bool = False
    verbose: int = 0
    stdout: Any = field(default_factory=lambda: sys.stdout)

    @cached_property
    def config(self) -> FleetConfig:
        """The validated fleet config; a ``ConfigError`` here makes the CLI exit 2."""
        from vmvault.worker.config import load_config

        return load_config(self.config_file)

    def repository_config(self, args: argparse.Namespace) -> RepositoryConfig:
        """The repository a command acts on: ``--repository NAME``, else the primary one
        (``ConfigError``, exit 2, for a name the config does not have)."""
        return self.config.repository_config(getattr(args, "repository", None))

    @cached_property
    def console(self) -> Console:
        """Rich console on stderr for progress bars, tables and messages."""
        from rich.console import Console

        return Console(stderr=True, highlight=False)

    @property
    def interactive(self) -> bool:
        """True when a person watches stderr: progress bars are worth drawing."""
        return self.console.is_terminal and not self.json

    def emit(self, obj: Any) -> None:
        """Print one JSON document on stdout (used with ``--json``)."""
        self.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
        self.stdout.flush()

    @cached_property
    def human(self) -> Console:
        """Where human output goes: stdout, or stderr when stdout is reserved for JSON."""
        if self.json:
            return self.console
        from rich.console import Console

        return Console(file=self.stdout, highlight=False, soft_wrap=True)

    def say(self, message: str) -> None:
        """A line of human output (stdout; stderr under ``--json``)."""
        self.human.print(message)

    def note(self, message: str) -> None:
        """A status message about the work (queued, waiting, ...): always stderr."""
        self.console.print(message)


def add_repository_flag(parser: argparse.ArgumentParser, verb: str = "act on") -> None:
    """Add ``--repository NAME`` (a key of the config's ``repositories``)."""
    parser.add_argument(
        "--repository",
        metavar="NAME",
        help=f"{verb} this repository of the config's 'repositories' instead of the primary one",
    )


class Handler(Protocol):
    """A command handler: returns the process exit code."""

    def __call__(self, args: argparse.Namespace, ctx: CliContext) -> int: ...
