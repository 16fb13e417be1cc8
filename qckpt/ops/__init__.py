"""Operations on a store: garbage collection, fsck, join and average, diff, history,
lazy views, zarr export and the zarr store view.

Each takes a ``qckpt.store.Store`` (never the ``Repository`` facade, which
calls them). Internal to qckpt.
"""
