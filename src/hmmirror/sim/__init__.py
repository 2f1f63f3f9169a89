"""hmmirror.sim."""
