"""Shared fixtures: a tiny random IDEFICS checkpoint (written once per run), a backend on it, images.

Nothing here reaches beyond loopback: the hub is switched off before transformers is imported.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import io
from pathlib import Path

import pytest
from PIL import Image

from bot.runtime.config import Config, load_config
from model.loading import CheckpointSettings
from model.local import BatchSettings, LocalBackend
from model.service import Chat, Message
from model.tiny import write_tiny_checkpoint
from tests.model_tap import tap  # noqa: F401 (fixtures every test may use)
from tests.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures: a real PostgreSQL)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """A tiny checkpoint of each family, written when first asked for: "idefics" (v1), "idefics3"
    (SmolVLM's layout, images cut into tiles) and "idefics3-whole" (no image splitting)."""
    written: dict[str, Path] = {}

    def checkpoint(name: str) -> Path:
        if name not in written:
            family, _, whole = name.partition("-")
            written[name] = write_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{name}"), family=family, image_splitting=not whole)
        return written[name]

    return checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(request, tiny_checkpoints) -> Path:
    """The tiny IDEFICS v1 checkpoint, or another family's where a test is marked `BOTH_FAMILIES`."""
    return tiny_checkpoints(getattr(request, "param", "idefics"))


# Runs a test, and every fixture built on `tiny_checkpoint` (backend, config, the bots), on each family.
BOTH_FAMILIES = pytest.mark.parametrize("tiny_checkpoint", ["idefics", "idefics3"], indirect=True)


@pytest.fixture
async def backend(tiny_checkpoint):
    service = await LocalBackend.open(CheckpointSettings(str(tiny_checkpoint)), BatchSettings(max_batch_size=8))
    yield service
    await service.close()


def guided(items) -> Chat:
    """A chat that IDEFICS v1 receives as `items`, verbatim (its one user message holds the same parts)."""
    return Chat((Message("user", tuple(item.strip() if isinstance(item, str) else item for item in items)),), guide=tuple(items))


def image_bytes(color=(200, 30, 30), size=(64, 48), kind="PNG", **save) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, kind, **save)
    return buffer.getvalue()


def write_config(path: Path, text: str) -> Config:
    path.write_text(text, encoding="utf-8")
    return load_config(path, environ={})


@pytest.fixture
def config(tmp_path, tiny_checkpoint) -> Config:
    """Defaults, on the tiny checkpoint, with state in a temporary directory."""
    return tiny_config(tmp_path, tiny_checkpoint)


def tiny_config(tmp_path: Path, tiny_checkpoint: Path) -> Config:
    return write_config(
        tmp_path / "config.toml",
        f"""
[model]
checkpoint = "{tiny_checkpoint}"
[generation]
max_new_tokens = 24
[limits]
per_user_burst = 1000  # tests send bursts from one user; tests/test_fairness.py covers the limiter
[state]
path = "{tmp_path / 'state' / 'bot.sqlite3'}"
""",
    )
