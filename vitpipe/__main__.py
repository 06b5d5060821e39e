"""``python -m vitpipe`` is the ``vitpipe`` command."""

import sys

from vitpipe.cli import main

sys.exit(main())
