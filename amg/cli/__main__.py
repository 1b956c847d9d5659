"""`python -m amg.cli`: the same as the `amg` command."""

import sys

from amg.cli import main

sys.exit(main())
