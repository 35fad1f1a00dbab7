"""Continuous batching vs one at a time: the same as `misotts-agents bench` (see misotts_agents/tools/bench.py)."""

import sys

from misotts_agents.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
