"""BPTT vs RTRL and its approximations: gradient agreement, cost scaling and learning curves.

Usage: python experiments/compare_bptt_rtrl.py configs/compare_small.yaml [key.path=value ...] [--out DIR]
       [--only agreement,scaling,training]
Same as ``jbptt compare CONFIG``; writes report.json, report.md and PNG plots to the config's out_dir.
"""

import sys

from jbptt.experiment.compare import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
