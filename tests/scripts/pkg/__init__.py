"""A package run with ``-m pkg.train`` and ``-m pkg``."""
