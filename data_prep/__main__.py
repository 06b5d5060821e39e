"""``python -m data_prep prep <source|merge|verify|inspect> ...``: the prep command without torch imports."""

import sys

from data_prep.cli import main

sys.exit(main())
