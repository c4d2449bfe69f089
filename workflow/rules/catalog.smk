# Per-region Bayesian catalogs: detect -> regions (checkpoint) -> fit_region per region -> merge.


def catalog_targets():
    return []
