"""The web chat: HTTP routes, sessions and their guard, its `[web]` settings, and its page (page/)."""

from adapters.web.adapter import WebAdapter

__all__ = ["WebAdapter"]
