"""The ``hmmirror`` command line."""
