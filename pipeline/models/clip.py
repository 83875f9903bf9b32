"""CLIP models through open_clip."""

from __future__ import annotations


def available_models() -> list[str]:
    """Architecture names that open_clip can build (its own configs and any registered here)."""
    import open_clip

    return open_clip.list_models()
