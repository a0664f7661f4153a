"""Adapters for training frameworks; each module imports its framework, so none is imported by
``import safeckpt``. Public paths: :mod:`safeckpt.lightning` and :mod:`safeckpt.hf`."""
