"""hmmirror.kernel."""
