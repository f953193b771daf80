"""Run the policy server: python -m greylist."""

import sys

from greylist.cli import main

sys.exit(main())
