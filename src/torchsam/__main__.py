"""``python -m torchsam``: the ``torchsam`` command (see :mod:`torchsam.experiments.cli`)."""

import sys

from torchsam.experiments.cli import main

sys.exit(main())
