"""Data for the pipeline: the prepared-data format every stage reads (``prepared``), the sources
of raw images (``sources``, ``cifar``, ``subset``) and the ``prepare`` stage (``prepare``).

Import from the submodules: this package imports none of them, so a training stage that
reads prepared data does not depend on the source readers' code.
"""
