"""dalle_proto: a DALL·E reproduction — BPE text tokens + discrete image tokens + one transformer."""
__version__ = "0.1.0"
