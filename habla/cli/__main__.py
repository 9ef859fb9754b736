"""``python -m habla.cli``: the ``habla`` command run by a given Python (torchrun uses this; no PATH lookup)."""

import sys

from habla.cli import main

sys.exit(main())
