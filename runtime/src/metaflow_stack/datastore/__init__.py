"""Reading what Metaflow wrote, for every reader in the stack.

Metaflow's own layout and conventions, once: which attempt a metadatum or
tag belongs to (``attempts``), the type names it records (``type_names``),
where a task attempt's logs are and how to read them in ranges, locally or
from S3 (``log_files``), windows over them (``log_windows``), the cursor
format every paged answer uses (``cursors``), artifact values by content
hash (``blobs``) with bounded previews that never unpickle code
(``previews``), the cards ``@card`` wrote (``cards``), the task metadata every
reader shows read back bounded, whoever wrote it (``task_metadata``), and the
metadata fields the stack's own decorators record (below). The metadata service, the
agent's sources and the UI read through this package and never through each
other's internals.
"""

#: The metadata field ``@confidential``'s launcher records each attempt's verification in (a JSON object).
CONFIDENTIAL_FIELD = "confidential-verification"
