"""``python -m lcnn_zoo.train`` / ``torchrun -m lcnn_zoo.train``: see :mod:`lcnn_zoo.training`."""
import sys

from .training import main

if __name__ == "__main__":
    sys.exit(main())
