"""Subcommands of the ``fedfuse`` command; each module has ``configure(parser)`` and ``run(args)``."""
