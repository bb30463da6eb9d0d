"""``@confidential``: steps in a TEE whose results are trusted only after their attestation is verified.

``policy`` (what an enclave must be), ``attest`` (a quote checked against
collateral, the policy and this task's binding), ``seal`` (artifacts
encrypted before they leave the enclave).
"""
