"""`python -m earkit ...`, the same as `earkit ...`."""

import sys

from earkit.cli import main

sys.exit(main())
