"""Re-exports :mod:`jbptt.testing` (the shared test helpers) for test files that still import ``helpers``."""

from jbptt.testing import *  # noqa: F403
from jbptt.testing import __all__  # noqa: F401
