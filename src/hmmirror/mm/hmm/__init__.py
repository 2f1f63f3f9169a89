"""hmmirror.mm.hmm."""
