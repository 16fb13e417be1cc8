"""The commit layer: staging, the hot tier, the asynchronous writer, optimizer-aware
predictions, the lossy tier, and ``write_arrays`` (chunk, dedup, encode, pack)
run inside a store transaction.

Built on ``qckpt.store`` and ``qckpt.format``. Internal to qckpt.
"""
