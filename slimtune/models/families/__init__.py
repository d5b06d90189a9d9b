"""One file per model family; each builds an ``ArchSpec`` and registers it (see ``slimtune.models.arch``)."""
