"""``python -m data_prep prep imagenet --src DIR --out DIR``: run the prep command stand-alone."""

import sys

from data_prep.cli import main

sys.exit(main())
