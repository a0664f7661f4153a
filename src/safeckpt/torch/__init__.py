"""The torch adapter: tensors <-> archives, state capture and restore, RNG, save and load.

Imported only on first use of a torch verb (``import safeckpt`` never imports torch).
"""
