"""Run the policy server: python -m greylist."""

import sys

from greylist.cli.greylist import main

sys.exit(main())
