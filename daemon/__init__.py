"""usfmd: the service — CLI, configuration, DB schema and queue, DICOM receive, scheduling."""

__version__ = "0.1.0"
