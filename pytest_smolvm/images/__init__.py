"""Guest images: recipe -> kernel / initramfs / rootfs, content-addressed in the cache."""

from .recipe import Recipe
from .store import Image, resolve

__all__ = ["Image", "Recipe", "resolve"]
