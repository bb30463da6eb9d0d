"""What a Gramine step's image and its launcher agree on (``step_image`` on this machine, ``enclave_build``
inside the image at build time): where the enclave lives in the image, the build secret the signing key
comes as, and the staged settings. Kept apart so the in-image build imports none of the image tooling
(``step_image``'s Docker client and builders) it has no use for."""

from __future__ import annotations

from pydantic import BaseModel

#: Where the enclave lives in the image: its code, its prepared manifest, and the folder its tasks'
#: exchange folders are mounted in.
ENCLAVE = "/opt/enclave"
CODE = f"{ENCLAVE}/code"
#: The step's own packages (its ``@pypi`` environment): after the code on the enclave's ``PYTHONPATH``, so
#: before the runtime's packages, as a Metaflow environment's are.
PACKAGES = f"{ENCLAVE}/env"
EXCHANGES = f"{ENCLAVE}/evidence"
#: The build secret the enclave signing key is mounted as (``RUN --mount=type=secret,id=enclave-key``).
KEY_SECRET = "enclave-key"
#: The staged enclave settings ``enclave_build`` reads, and what it leaves for the launcher.
SPEC, READY = "enclave.json", "ready.json"
#: The staged environment (``StepEnvironment``), in a layer below the code: a new code package reuses it;
#: and the folder of its wheels, mounted into the build (never in a layer).
ENVIRONMENT, WHEELS = "environment.json", "wheels"


class StepEnclave(BaseModel):
    """What the launcher stages for ``enclave_build``: the enclave's settings and its fixed environment."""

    mode: str
    enclave_size: str
    threads: int
    isv_prod_id: int
    isv_svn: int
    env: dict[str, str]
    datastore: str
    #: The signer of an SGX enclave (public): a new key makes a new image.
    mr_signer: str | None


class StepEnvironment(BaseModel):
    """The step's environment as Metaflow solved it (``solved_environment``): its Python (major.minor), which
    the image's must be, and its wheels, by their file names in ``WHEELS``; none for a step without one."""

    python: str | None = None
    wheels: list[str] = []
