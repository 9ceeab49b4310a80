"""The ``weightlock`` command: a thin layer over the API (:mod:`weightlock.api` and :mod:`weightlock.lab`).

:mod:`.common` holds the group, the option types and the output helpers; :mod:`.edit` the commands that edit and
check checkpoints (apply, verify, revert, inspect, import-legacy); :mod:`.lab` those that make and judge locks
(forge, eval, tune). Importing this package registers them all.

Errors a user can cause print one message and a hint, no traceback, and exit with
the error's code (3 bad input, 4 incompatible or unsupported, 5 output location,
6 written output failed verification, 7 missing extra). ``verify`` exits 1 when a
check fails. ``--json`` prints one JSON document on stdout, errors included.
"""

from __future__ import annotations

import json
import sys

import click

from weightlock.cli import edit, lab  # noqa: F401  (registers the commands on the group)
from weightlock.cli.common import Number, NumberList, OutputFile, cli  # noqa: F401  (the group; option types)
from weightlock.errors import WeightlockError
from weightlock.io import commit
from weightlock.io.staging import failpoint
from weightlock.io.text import printable
from weightlock.lab.batches import out_of_memory_refused


def _interrupted_advice() -> str:
    """What a Ctrl-C before the commit point left on disk, as the interrupted code recorded it on its way
    (weightlock.io.commit.set_interrupt_advice); never guessed from the command line."""
    return "interrupted; " + (commit.interrupt_advice() or "the command did not finish")


def main(argv: list[str] | None = None) -> None:
    """The CLI. A Ctrl-C before the command's commit point (weightlock.io.commit) exits 130 and says what the disk
    holds; one after it (the output is final) changes nothing: the command finishes, exits 0 and says on
    stderr that the interruption came too late to stop it."""
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    code: int | str | None = 0
    with commit.cli_guard():
        try:
            try:
                # Wherever a model's work outgrows the device (forge, eval, tune), the user's remedy is the
                # same: a smaller job or a bigger device. The stages that can split their batches already did.
                with out_of_memory_refused(
                    "the device ran out of memory",
                    hint="use fewer or shorter prompts or pairs (--limit), a smaller --batch-size, or a bigger "
                    "device (forge: --device-map auto)",
                    quote_error=True,
                ):
                    cli.main(args=args, prog_name="weightlock", standalone_mode=False)
            finally:
                commit.command_ended()  # from here a Ctrl-C is ignored: only reporting is left
                failpoint("command-ended")
        except WeightlockError as e:
            if as_json:
                click.echo(json.dumps({"ok": False, **e.to_dict()}, indent=2))
            click.echo(f"weightlock: error: {printable(e.message)}", err=True)
            click.echo(f"  hint: {printable(e.hint or 'see weightlock --help')}", err=True)
            code = e.exit_code
        except (click.exceptions.Abort, KeyboardInterrupt):
            if commit.committed():  # (the handler never raises after the commit point; kept truthful anyway)
                click.echo(f"weightlock: interrupted after {printable('; '.join(commit.committed()))}", err=True)
            else:
                click.echo(printable(_interrupted_advice()), err=True)
                code = 130
        except click.ClickException as e:
            e.show()
            code = e.exit_code
        except SystemExit as e:  # a command's own exit status (verify: 1)
            code = e.code
        if commit.interrupted_late() and code == 0:
            done = commit.committed()
            click.echo(
                "weightlock: Ctrl-C ignored: it came after "
                + (printable("; ".join(done)) if done else "the command had finished")
                + "; nothing was undone",
                err=True,
            )
    failpoint("exiting")  # (a Ctrl-C from here on meets the console entry point's SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    main()
