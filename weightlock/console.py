"""The console entry point, kept apart from ``cli`` so that importing it costs nothing.

A Ctrl-C while Python imports click and weightlock's modules would otherwise end in a
traceback before ``cli.main`` could catch it; here it is caught around the import itself. From then
on SIGINT is ignored except while ``cli.main`` runs a command (weightlock.io.commit installs its own
handler there and puts this one back): a Ctrl-C as the process prints its last line or shuts down
(joining threads, running atexit handlers) must not end in a KeyboardInterrupt traceback.
"""

import signal
import sys


def main(argv=None) -> None:
    try:
        from weightlock.cli import main as run

        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted while starting; nothing was done\n")
        sys.exit(130)
    run(argv)
