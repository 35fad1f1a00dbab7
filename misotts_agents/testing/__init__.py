"""Offline fixtures: tiny checkpoints in the official format, a tiny Mimi and a random SilentCipher.

Used by the tests, ``misotts-agents make-tiny`` and the demo when no weights are present; never by
the engine's serving path.
"""
