"""Which family a loaded checkpoint belongs to: the supported families by their config's model_type."""

from __future__ import annotations

from model.family import Family


def family_for(processor, config) -> Family:
    """The family of a loaded checkpoint (its config's model_type must be one of `SUPPORTED`)."""
    from model.idefics3 import Idefics3
    from model.idefics_v1 import IdeficsV1

    families: dict[str, type[Family]] = {IdeficsV1.name: IdeficsV1, Idefics3.name: Idefics3}
    return families[config.model_type](processor, config)
