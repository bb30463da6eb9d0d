"""``@confidential``: steps in a TEE whose results are trusted only after their attestation is verified.

``policy`` (what an enclave must be), ``attest`` (a quote checked against
collateral, the policy and this task's binding), ``keyrelease`` (the data
key to an attested enclave only), ``seal`` (artifacts encrypted before they
leave it), ``manifest`` and ``gramine`` (a task's enclave), ``launcher``
(the trampoline's side), ``inside`` (the enclave's side). A step reads an
upstream confidential step's sealed artifact with ``unsealed(self, "NAME")``.
"""

from typing import Any


def unsealed(flow: Any, name: str) -> Any:
    """An upstream confidential step's sealed artifact ``name`` (``unsealed(self, "predictions")``), opened
    with the run's data key in a confidential step's enclave; refused when it is not sealed, or was sealed
    for another run or artifact. ``inside`` is the enclave's entry module: imported here only when called,
    so running it as ``-m`` finds it fresh."""
    from metaflow_stack.confidential import inside

    return inside.unsealed(flow, name)
