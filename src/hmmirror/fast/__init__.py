"""hmmirror.fast."""
