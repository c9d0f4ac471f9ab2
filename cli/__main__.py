"""`python -m cli`: the same as the `din` command."""

import sys

from cli import main

sys.exit(main())
