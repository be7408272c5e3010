"""Character-level language model over the corpus as one stream, trained with stateful TBPTT(k1, k2).

A thin wrapper: ``python experiments/char_lm_tbptt.py [overrides] [jbptt run options]`` is
``jbptt run configs/char_lm_tbptt.yaml [overrides] [options]`` (the runner's ``training.chunk`` and
``training.stateful_stream``; see the config's comments). The val bits/char are the run's ``summary.json``
``final.val.bpc``.
"""

from __future__ import annotations

import os
import sys

from jbptt import cli

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "char_lm_tbptt.yaml")

if __name__ == "__main__":
    sys.exit(cli.main(["run", CONFIG, *sys.argv[1:]]))
