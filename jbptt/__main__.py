"""``python -m jbptt ...`` is ``jbptt ...``."""

import sys

from jbptt.cli import main

sys.exit(main())
