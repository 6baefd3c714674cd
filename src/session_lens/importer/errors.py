"""What stops an import; bad rows never do, they are refused and reported.

ImportUsage    the import cannot start as asked (exit 2)
ImportFailed   a source or the lifecycle store failed (exit 1)
"""


class ImportUsage(Exception):
    """The import cannot start as asked: a bad option, source shape or state expression."""


class ImportFailed(Exception):
    """A source or the lifecycle store failed during the import; committed pages stay."""
