"""`python -m heft` is the `heft` command."""

import sys

from heft.cli import main

sys.exit(main())
