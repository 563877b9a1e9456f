"""The audit trail: DICOM PS3.15 A.5 audit messages (IHE ATNA) to a local file and syslog collectors.

``messages`` builds the XML, ``syslog`` frames and delivers it (RFC 5424 over TCP, RFC 6587, or
TLS, RFC 5425), ``trail`` records the node's events durably (:class:`AuditTrail`).
"""

from reader.audit.messages import PatientObject
from reader.audit.trail import AuditTrail

__all__ = ["AuditTrail", "PatientObject"]
