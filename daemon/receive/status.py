"""Every DIMSE status and A-ASSOCIATE-RJ reason usfmd sends, named, with the table it comes from.

Handlers return these constants only; a bare hex status in a handler is a review finding.
"""

from __future__ import annotations

from typing import Final

# PS3.7 Annex C.1 — Success (all services)
SUCCESS: Final = 0x0000

# PS3.7 Annex C.4 — general failure statuses usable by any DIMSE service
PROCESSING_FAILURE: Final = 0x0110
NO_SUCH_SOP_INSTANCE: Final = 0x0112
NO_SUCH_ARGUMENT: Final = 0x0114
INVALID_ARGUMENT_VALUE: Final = 0x0115
INVALID_OBJECT_INSTANCE: Final = 0x0117
CLASS_INSTANCE_CONFLICT: Final = 0x0119
MISSING_ATTRIBUTE: Final = 0x0120
NO_SUCH_ACTION_TYPE: Final = 0x0123
DUPLICATE_INVOCATION: Final = 0x0210
RESOURCE_LIMITATION: Final = 0x0213

# PS3.4 Annex B.2.3, Table B.2-1 — Storage Service Class C-STORE statuses
STORE_OUT_OF_RESOURCES: Final = 0xA700  # Refused: Out of Resources
STORE_DATA_SET_MISMATCH: Final = 0xA900  # Error: Data Set does not match SOP Class
STORE_CANNOT_UNDERSTAND: Final = 0xC000  # Error: Cannot understand (C000-CFFF)

# PS3.4 Annex J.3.2.1 / Table J.3-2 — Storage Commitment Failure Reason (0008,1197) values
COMMIT_PROCESSING_FAILURE: Final = PROCESSING_FAILURE
COMMIT_NO_SUCH_OBJECT_INSTANCE: Final = NO_SUCH_SOP_INSTANCE
COMMIT_RESOURCE_LIMITATION: Final = RESOURCE_LIMITATION
COMMIT_SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
COMMIT_CLASS_INSTANCE_CONFLICT: Final = CLASS_INSTANCE_CONFLICT
COMMIT_DUPLICATE_TRANSACTION_UID: Final = 0x0131

# PS3.4 Annex J.3.3.1 — N-EVENT-REPORT Event Type IDs of the Storage Commitment report
COMMIT_EVENT_ALL_SUCCESS: Final = 1
COMMIT_EVENT_FAILURES_EXIST: Final = 2
# PS3.4 Annex J.3.2.1 — the one N-ACTION Action Type: "Request Storage Commitment"
COMMIT_ACTION_REQUEST: Final = 1

# PS3.8 §9.3.4, Table 9-21 — A-ASSOCIATE-RJ (result, source, reason)
REJECTED_PERMANENT: Final = 0x01
REJECTED_TRANSIENT: Final = 0x02
SOURCE_SERVICE_USER: Final = 0x01
SOURCE_SERVICE_PROVIDER_PRESENTATION: Final = 0x03
REASON_NO_REASON_GIVEN: Final = 0x01
REASON_CALLING_AE_NOT_RECOGNIZED: Final = 0x03
REASON_CALLED_AE_NOT_RECOGNIZED: Final = 0x07
REASON_LOCAL_LIMIT_EXCEEDED: Final = 0x02  # with SOURCE_SERVICE_PROVIDER_PRESENTATION
