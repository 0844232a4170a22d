"""``python -m broker.cli``: the ``broker`` command."""

import sys

from broker.cli import main

sys.exit(main())
