"""``@confidential``: steps in a TEE whose results are trusted only after their attestation is verified.

``policy`` (what an enclave must be), ``attest`` (a quote checked against
collateral, the policy and this task's binding), ``keyrelease`` (the data
key to an attested enclave only), ``seal`` (artifacts encrypted before they
leave it), ``manifest`` and ``gramine`` (a task's enclave), ``launcher``
(the trampoline's side), ``inside`` (the enclave's side). A step reads an
upstream confidential step's sealed artifact with ``unsealed(self, "NAME")``.
"""

from typing import Any

#: The public key (hex) of the keeper whose signed envelopes the enclave opens, fixed in its manifest (so
#: measured): set only in an enclave, which is how code there knows it is in one. Here, not in ``inside``, so
#: that asking costs no import of what an enclave needs (Metaflow asks on every artifact it reads).
KEEPER_KEY = "METAFLOW_STACK_CONFIDENTIAL_KEEPER"
#: The platform, as Metaflow's environments name it, of every TEE here: Gramine is built for x86-64, and
#: Phala's CVMs are x86-64. A step's environment is solved for it.
PLATFORM = "linux-64"


def unsealed(flow: Any, name: str) -> Any:
    """An upstream confidential step's sealed artifact ``name`` (``unsealed(self, "predictions")``), opened
    with the run's data key in a confidential step's enclave; refused when it is not sealed, or was sealed
    for another run or artifact. ``inside`` is the enclave's entry module: imported here only when called,
    so running it as ``-m`` finds it fresh."""
    from metaflow_stack.confidential import inside

    return inside.unsealed(flow, name)
