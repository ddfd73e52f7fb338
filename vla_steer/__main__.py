"""`python -m vla_steer ...`: the `vla-steer` command, from any interpreter that can import the package."""

import sys

from vla_steer.app.cli import main

sys.exit(main())
