"""Command-line tools: ``cli`` (the ``misotts-agents`` command), ``bench`` and the browser ``demo``."""
