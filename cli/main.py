"""The `chatvec` command. Subcommands live in their own modules and are imported only when run,
so `chatvec --help` and a `--workers 0` merge never pay for importing Ray."""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from chatvec.core.errors import ChatvecError
from chatvec.core.registry import Registry

# each a click.Command, imported only when run (or when its own --help is asked for)
COMMANDS: Registry[click.Command] = Registry("command")
COMMANDS.register(
    "extract", "chatvec.cli.cmd_merge:extract", summary="Write a chat vector (chat - base) as a safetensors checkpoint."
)
COMMANDS.register(
    "merge", "chatvec.cli.cmd_merge:merge", summary="Merge CP + ratio * (chat - base) into a new checkpoint."
)
COMMANDS.register("benchmarks", "chatvec.cli.cmd_eval:benchmarks", summary="List the benchmarks chatvec ships.")
COMMANDS.register("eval", "chatvec.cli.cmd_eval:eval_cmd", summary="Evaluate models over languages and benchmarks.")
COMMANDS.register("sweep", "chatvec.cli.cmd_sweep:sweep", summary="Run a sweep: merges x evaluation x report.")
COMMANDS.register(
    "nightly", "chatvec.cli.cmd_sweep:nightly", summary="Run a sweep as tonight's run and check for regressions."
)
COMMANDS.register(
    "tune",
    "chatvec.cli.cmd_tune:tune",
    summary="Search for the best recipe on dev items and confirm it on held-out test items.",
)
COMMANDS.register(
    "results", "chatvec.cli.cmd_sweep:results", summary="List runs, print a run's summary or compare two runs."
)
COMMANDS.register(
    "report",
    "chatvec.cli.cmd_report:report",
    summary="Write a run's HTML report and answer browser (sweep or eval).",
)
COMMANDS.register(
    "demo", "chatvec.cli.cmd_demo:demo", summary="Merge and evaluate the toy world's chat vector (the main demo)."
)
COMMANDS.register(
    "toyworld",
    "chatvec.cli.cmd_toyworld:toyworld",
    summary="Build the seeded toy world where the chat vector effect is real.",
)


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in COMMANDS.names() if _available(COMMANDS.target(name)))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name = COMMANDS.target(name).split(":")[0]
        try:
            return COMMANDS[name]
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                return None
            raise

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table, so `--help` imports no subcommand module.
        rows = [(name, COMMANDS.summary(name)) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _available(target: str) -> bool:
    return importlib.util.find_spec(target.split(":")[0]) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="chatvec")
def cli(verbose: int) -> None:
    """chatvec: chat vectors (arXiv 2310.04799) merged and evaluated at cluster scale."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> None:
    try:
        rv = cli.main(args=argv, prog_name="chatvec", standalone_mode=False)
    except ChatvecError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    # a command may return an int: its exit status (e.g. nightly's regression status)
    if isinstance(rv, int) and rv:
        sys.exit(rv)


def entry() -> None:
    """The console script: `main`, then an exit that skips C++ static destructors.

    pyarrow 26 sometimes aborts ("terminate called without an active exception") while its
    thread pools are torn down at interpreter exit, which would turn any exit status, nightly's
    regression status included, into 134. Python's own exit handlers (Ray's shutdown, S3
    finalisation, log flushing) still run first.
    """
    import atexit

    code = 0
    try:
        main()
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


if __name__ == "__main__":
    entry()
