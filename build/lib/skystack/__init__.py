"""skystack: wide-field survey images to tile caches, catalogs, deconvolved stamps and
digital-tracking detections of faint solar-system objects."""

__version__ = "0.1.0"
