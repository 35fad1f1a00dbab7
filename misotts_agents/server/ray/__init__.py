"""Ray Serve deployment: one engine replica per GPU behind a session-affinity router (``serve``, ``router``)."""
