"""Continuous batching vs one at a time: the same as `misotts-agents bench` (see misotts_agents/bench.py)."""

import sys

from misotts_agents.bench import main

if __name__ == "__main__":
    sys.exit(main())
