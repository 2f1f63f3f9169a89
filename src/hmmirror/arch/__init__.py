"""hmmirror.arch."""
