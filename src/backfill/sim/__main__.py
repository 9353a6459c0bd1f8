"""`python -m backfill.sim ...`: the simulator server (same options as `backfill sim`)."""

import sys

from backfill.sim.server import main

sys.exit(main())
