"""hmmirror.mm."""
