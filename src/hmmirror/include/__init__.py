"""hmmirror.include."""
