"""``python -m lcnn_zoo <command> …`` (and ``torchrun -m lcnn_zoo train …``): the ``lcnn-zoo`` command."""
import sys

from .commands.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
