"""The photo in: reading an image file, its mask and its checks, recentring, and the lists of
photos a dataset run reads.

Modules are imported where used.
"""

__all__ = ["dataset_listing", "image_input", "mask_checks", "photo_file"]
