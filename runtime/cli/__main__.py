"""`python -m sdrt.cli ...` is `sdrt ...`."""

import sys

from sdrt.cli import main

sys.exit(main())
