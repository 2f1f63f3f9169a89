"""hmmirror.scenario."""
