"""The console entry point, kept apart from ``cli`` so that importing it costs nothing.

A Ctrl-C while Python imports click, numpy and weightlock's modules would otherwise end in a
traceback before ``cli.main`` could catch it; here it is caught around the import itself.
"""

import sys


def main(argv=None) -> None:
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted while starting; nothing was done\n")
        sys.exit(130)
    run(argv)
