"""Which family a loaded checkpoint belongs to: the supported families by their config's model_type."""

from __future__ import annotations

from model.family import Family
from model.image_cache import ImageCache


def family_for(processor, config, image_cache: ImageCache | None = None) -> Family:
    """The family of a loaded checkpoint (its config's model_type must be one of `SUPPORTED`), keeping
    encoded images in `image_cache` (none by default)."""
    from model.idefics3 import Idefics3
    from model.idefics_v1 import IdeficsV1

    families: dict[str, type[Family]] = {IdeficsV1.name: IdeficsV1, Idefics3.name: Idefics3}
    return families[config.model_type](processor, config, image_cache)
