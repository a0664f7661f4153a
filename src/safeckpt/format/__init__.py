"""The on-disk format: limits, manifest, safetensors header, JSON/msgpack documents, state trees.

Pure Python (no torch, no I/O): everything here turns bytes into validated values and back.
"""
