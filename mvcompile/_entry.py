"""The ``mvcompile`` command: the CLI, imported inside a Ctrl-C handler.

Importing the CLI loads onnx, ONNX Runtime and numpy (about a second); a Ctrl-C then would
otherwise end in a traceback.
"""

from __future__ import annotations

import sys

SIGINT_STATUS = 130


def main() -> None:
    try:
        from mvcompile.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("\nInterrupted; no output was written.\n")
        sys.exit(SIGINT_STATUS)
    cli_main()
