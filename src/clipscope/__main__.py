"""``python -m clipscope`` is the same as the ``clipscope`` command."""

import sys

from clipscope.cli import main

sys.exit(main())
