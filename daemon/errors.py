"""usfmd's exception hierarchy: every failure we raise on purpose is one of these.

Messages quote the offending value and say what was expected, so an operator can act on them
without reading code.
"""


class UsfmdError(Exception):
    """Base of every error usfmd raises deliberately."""


class ConfigError(UsfmdError):
    """The configuration (file or ``USFMD_*`` environment) is invalid."""


class ListenError(UsfmdError):
    """The DICOM listener cannot bind its address (port taken, address not on this host)."""


class ConformanceError(UsfmdError):
    """A DICOM object or exchange does not conform to what the standard requires."""


class ArchiveError(UsfmdError):
    """The archive cannot store or find a file."""


class DiskFullError(ArchiveError):
    """Free space is below the configured watermark: refuse before writing."""


class DatabaseError(UsfmdError):
    """The index database is unreachable or at an unexpected schema revision."""
