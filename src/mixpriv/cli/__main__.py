"""``python -m mixpriv.cli``: the ``mixpriv`` command line (see :mod:`mixpriv.cli`)."""

import sys

from mixpriv.cli import main

if __name__ == "__main__":
    sys.exit(main())
