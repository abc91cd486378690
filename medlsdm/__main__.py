"""``python -m medlsdm`` (and ``torchrun -m medlsdm``) runs the command line."""

import sys

from medlsdm.cli import main

sys.exit(main())
