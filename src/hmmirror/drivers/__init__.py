"""hmmirror.drivers."""
