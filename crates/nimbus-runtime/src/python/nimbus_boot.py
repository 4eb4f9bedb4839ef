"""Entry point of the Nimbus Python worker (`python -I -S -B nimbus_boot.py`).

The worker is imported rather than run as a script so that its byte code comes from the
__pycache__ the server writes once, instead of being compiled at every start.
"""

import sys

sys.path.insert(0, __file__.rpartition("/")[0] or ".")
import nimbus_worker  # noqa: E402

nimbus_worker.main()
