"""hmmirror.arch.x86."""
