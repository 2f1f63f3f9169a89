"""hmmirror.fs."""
