"""hmmirror.viz."""
