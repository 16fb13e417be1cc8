"""The format layer: ids, tensors, trees, records, objects, packs and codecs.

Bytes in, bytes out: nothing here does I/O or knows where things are stored.
Internal to qckpt (the public API is the ``qckpt`` package); docs/design.md
specifies every byte layout defined here.
"""
