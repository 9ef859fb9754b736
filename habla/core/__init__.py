"""What every layer shares: errors, storage, the output layout, key=value parsing, tables, JSON lines, progress.

Nothing here imports another habla package, NeMo, torch or kfp.
"""
