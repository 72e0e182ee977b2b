"""``python -m lcnn_zoo.timm_script <timm script> [its arguments]``: the documented name of
:mod:`lcnn_zoo.commands.timm_script` (timm's own scripts with the zoo's models registered)."""
import sys

from .commands.timm_script import main

if __name__ == "__main__":
    sys.exit(main())
