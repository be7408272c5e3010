"""jbptt's gradient estimators, one module each; importing this package registers them all.

``bptt`` is the reference; ``tbptt`` truncates it; ``rtrl`` is exact real-time recurrent learning and ``snap``,
``uoro``, ``kfrtrl``, ``eprop``, ``rflo`` approximate it, all over the shared online core :mod:`.online` and
:mod:`.compressed` (the per-unit influence and the eligibility-trace estimator).
"""

from jbptt.estimators import bptt, eprop, kfrtrl, rflo, rtrl, snap, tbptt, uoro

__all__ = ["bptt", "eprop", "kfrtrl", "rflo", "rtrl", "snap", "tbptt", "uoro"]
