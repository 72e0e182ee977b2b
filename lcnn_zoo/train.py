"""``python -m lcnn_zoo.train`` / ``torchrun -m lcnn_zoo.train``: ``lcnn-zoo train`` (see :mod:`lcnn_zoo.training`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["train"] + sys.argv[1:]))
