"""The ``fedfuse`` command line: the top layer, over ``simulations``, ``server``, ``client`` and ``common``."""
