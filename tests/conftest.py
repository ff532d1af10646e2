"""The project root on ``sys.path`` however pytest is started, so tests import their helpers as
``tests.tiny`` and ``tests.federation_kit``, and the project's packages from the checkout."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
