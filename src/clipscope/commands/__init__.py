"""Sub-commands of the ``clipscope`` CLI, one module each (found by :mod:`clipscope.cli`)."""
