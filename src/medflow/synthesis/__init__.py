"""AlignFlow: mask flow, mask-conditioned image flow, reward alignment, sampling."""
