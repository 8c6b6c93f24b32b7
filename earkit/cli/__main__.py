"""`python -m earkit.cli ...`, the same as `earkit ...`."""

import sys

from earkit.cli import main

sys.exit(main())
