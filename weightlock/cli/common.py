"""The click group, the option types every command shares (numbers checked against one bounds table, output
files) and the output helpers (text lines made printable, or one JSON document).

Text from a checkpoint, a lock or a record cannot forge terminal output: every line printed goes through
``printable`` (:mod:`weightlock.io.text` holds the one table of hidden characters it escapes)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from weightlock import __version__
from weightlock.errors import InvalidInputError
from weightlock.io.text import printable

VERIFY_FAILED_EXIT = 1


def echo_lines(lines: str | list[str]) -> None:
    """Text output, each line made printable on its own (a string is one line)."""
    click.echo("\n".join(printable(line) for line in ([lines] if isinstance(lines, str) else lines)))


def emit(as_json: bool, data: dict, lines: str | list[str]) -> None:
    """One JSON document, or the text lines."""
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        echo_lines(lines)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")


class Number(click.ParamType):
    """A numeric option: the row ``field`` of ``bounds.BOUNDS`` (shared with the API's settings objects). A
    value outside it (NaN, infinities, out of range, not a number) is bad input: exit 3, naming the option and
    its range. Every numeric option of every command is one of these (tests/test_cli_contract.py checks)."""

    def __init__(self, field: str):
        from weightlock.core.bounds import BOUNDS

        self.field = field
        self.bound = BOUNDS[field]
        self.name = "integer" if self.bound.kind is int else "number"

    def convert(self, value, param, ctx):
        from weightlock.core.bounds import check_number

        return check_number(self.field, value, param.opts[0] if param is not None and param.opts else None)


class NumberList(click.ParamType):
    """Comma-separated numbers, each a row ``field`` of ``bounds.BOUNDS`` (tune's --alphas)."""

    name = "numbers"

    def __init__(self, field: str):
        self.field = field

    def convert(self, value, param, ctx):
        from weightlock.core.bounds import check_number

        if isinstance(value, list | tuple):
            return list(value)
        option = param.opts[0] if param is not None and param.opts else "--" + self.field
        items = [item for item in str(value).split(",") if item.strip()]
        if not items:
            raise InvalidInputError(f"{option} is empty", hint=f"e.g. {option} 0,1,2,4,6")
        numbers = []
        for item in items:
            try:
                numbers.append(check_number(self.field, item, option))
            except InvalidInputError as e:
                raise InvalidInputError(
                    f"{option} {str(value)[:60]!r} is not a comma-separated list of finite numbers: {e.message}",
                    hint=f"e.g. {option} 0,1,2,4,6",
                ) from None
        return numbers


class EngineList(click.ParamType):
    """Comma-separated names of the serving table's engines (verify's --engines), each known and named once. An
    empty, unknown or repeated name is a usage error (exit 2) that lists the known names; the value is shown
    escaped (it cannot forge terminal output)."""

    name = "engines"

    def convert(self, value, param, ctx):
        from weightlock.engines.serving_table import parse_engines
        from weightlock.errors import WeightlockError

        if isinstance(value, tuple):
            return value
        try:
            return parse_engines(str(value))
        except WeightlockError as e:
            self.fail(printable(f"{e.message} ({e.hint})"), param, ctx)


class OutputFile(click.Path):
    """A file weightlock writes. The command passes it through ``outputs.check_output_file`` with the inputs it
    reads before any work; tests/test_cli_contract.py finds every output option by this type."""

    def __init__(self, folder: bool = False):
        super().__init__(path_type=Path)  # what may be there is check_output_file's to say (exit 5), not click's
        self.folder = folder


def local_paths(location) -> list:
    """A MODEL/CHECKPOINT argument as an input path when it names something here (not only a Hub id)."""
    return [location] if location is not None else []


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="weightlock")
def cli() -> None:
    """Bake a SafetyLock into a checkpoint as o_proj biases, offline, and prove it loads."""
