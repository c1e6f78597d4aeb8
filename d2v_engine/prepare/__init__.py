"""Data preparation, offline, before any run: a raw folder checked once with the loaders' own
decoders into the manifests and token files they read (media.py: audio and images, text.py),
with what both share (common.py).

May import: the shared modules and data.
"""
