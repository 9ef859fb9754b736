"""``python -m habla``: the ``habla`` command."""

import sys

from habla.cli import main

sys.exit(main())
