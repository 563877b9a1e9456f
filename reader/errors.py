"""The error tree of the node.

Core modules raise these; the edges translate them once: the C-STORE handler into a DIMSE status
(``reader.scp``), the CLI into an exit code (``reader.cli``), the workers into a log event and a job
state (``reader.node``)::

    ReaderError
    ├── ConfigError            invalid configuration file or flag (CLI exit 2)
    ├── StorageError           the spool could not write or read durably
    │   ├── OutOfResources     free disk below the watermark (DIMSE 0xA700)
    │   ├── DatabaseUnavailable the state database cannot be reached (CLI exit 2 at start-up)
    │   └── SchemaTooNew       the state database's schema is newer than this code (CLI exit 2)
    ├── InputRejected          a dataset or series we will not process; ``reason`` is recorded
    │   ├── VolumeError        geometry that cannot form a trustworthy volume
    │   └── RequestRejected    a STOW-RS request refused whole (HTTP 400 / 415), nothing stored
    ├── ModelError             a model package that cannot be loaded or run
    │   ├── ManifestError      invalid model manifest (TOML)
    │   └── InferenceError     onnxruntime failed while running
    ├── EncodingError          SEG/SR could not be built from the findings
    ├── RetrieveError          a source PACS did not answer a query or retrieval (``reader backfill``)
    └── SendError              a delivery (C-STORE, STOW-RS, HL7, webhook) did not succeed
        ├── TransientSendError worth retrying later (association refused for load, timeout, 0xA7xx)
        └── PermanentSendError retrying cannot help (SOP class not supported, AE unknown, 0xA9xx/0xCxxx)
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DatabaseUnavailable",
    "EncodingError",
    "InferenceError",
    "InputRejected",
    "ManifestError",
    "ModelError",
    "OutOfResources",
    "PermanentSendError",
    "ReaderError",
    "RequestRejected",
    "RetrieveError",
    "SchemaTooNew",
    "SendError",
    "StorageError",
    "TransientSendError",
    "VolumeError",
]


class ReaderError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(ReaderError):
    """A configuration key has an invalid value; ``key`` names it, ``problem`` says why."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class StorageError(ReaderError):
    """The spool could not complete a durable write or read."""


class OutOfResources(StorageError):
    """Free space on the data dir is below the configured watermark."""


class DatabaseUnavailable(StorageError):
    """The state database (``[cluster] database``) cannot be reached: refused, timed out, or its
    credentials were not accepted. At start-up the CLI names it and exits 2; while working, the
    workers back off as on any StorageError and a receiver answers C-STORE Out of Resources."""


class SchemaTooNew(StorageError):
    """The state database carries a schema version newer than this code knows (a newer release
    migrated it): the node refuses to start rather than write rows it does not understand."""


class InputRejected(ReaderError):
    """Input that the node records as rejected instead of processing; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class VolumeError(InputRejected):
    """Instances that cannot be assembled into a geometry-checked volume."""


class RequestRejected(InputRejected):
    """An HTTP request refused as a whole; ``http_status`` is the answer (400, 415)."""

    def __init__(self, http_status: int, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.http_status = http_status


class ModelError(ReaderError):
    """A model package that cannot be loaded or run."""


class ManifestError(ModelError):
    """A model manifest that is invalid; ``key`` names the offending entry."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class InferenceError(ModelError):
    """onnxruntime failed while running a model."""


class EncodingError(ReaderError):
    """A SEG or SR could not be built from the findings."""


class RetrieveError(ReaderError):
    """A source PACS could not be associated with, or refused or failed a C-FIND or C-MOVE;
    ``status`` is the DIMSE status when one came back (``reader.queryretrieve``)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SendError(ReaderError):
    """A C-STORE to a destination did not succeed; ``status`` is the DIMSE status when one came back."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TransientSendError(SendError):
    """A send failure that is worth retrying later."""


class PermanentSendError(SendError):
    """A send failure that retrying cannot fix; the job is parked with the reason."""
