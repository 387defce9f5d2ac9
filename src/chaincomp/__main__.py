"""``python -m chaincomp <command> ...`` (the same as the ``chaincomp`` script)."""

import sys

from chaincomp.cli import main

sys.exit(main())
