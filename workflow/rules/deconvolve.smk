# Space-variant PSF deconvolution of galaxy stamps: extract -> deconvolve_shard per shard -> merge.


def deconvolve_targets():
    return []
