"""``python -m rwkv_stream``: the ``rwkv-stream`` command."""

import sys

from .cli import main

sys.exit(main())
