"""The model service: IDEFICS behind an async interface that knows nothing of chat platforms.

`model.service` holds the interface and its types; `model.local` runs IDEFICS in-process with batching.
"""
