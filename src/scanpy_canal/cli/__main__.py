"""``python -m scanpy_canal.cli``, the same as ``scanpy-canal``."""

import sys

from . import main

sys.exit(main())
