"""What a confidential step unpickles from outside its TEE: plain data, sealed values, and what it trusts.

Unpickling runs whatever the pickle names, and a task's inputs are read
from the datastore: whoever can write there (the launching machine's
operator among them) could hand an enclave a pickle that runs their code
inside it, before or after its evidence, with the data key in reach. So in
an enclave every artifact is unpickled through ``guarded_loads`` (Metaflow's
serializer hook, ``plugins/confidential/input_guard``): plain data
(``datastore.previews``), a sealed value's envelope (``seal.Sealed``: what
is inside opens only under the data key, so only an attested enclave made
it), Metaflow's own foreach frames, and the packages the step names in
``@confidential(trust=[...])``. Anything else is refused, naming the class
and the fix. ``trust`` is fixed in the enclave's manifest, so it is part of
the measurement a policy pins: trusting a package lets a crafted pickle call
what that package exposes, and a policy can tell which enclaves do.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

from metaflow_stack.confidential.seal import SealedError
from metaflow_stack.datastore.previews import NotPlainData, plain_class

#: The variable (fixed in the manifest) listing the top-level packages a step's enclave unpickles.
TRUST = "METAFLOW_STACK_CONFIDENTIAL_TRUST"
#: Classes beyond plain data that carry no code of the pickle's choosing: a sealed value's envelope, and
#: Metaflow's foreach frame (a named tuple Metaflow itself puts in ``__main__``, where the enclave's measured
#: flow file is).
_OWN = frozenset({("metaflow_stack.confidential.seal", "Sealed"), ("__main__", "ForeachFrame")})


def trusted() -> frozenset[str]:
    """The packages this enclave was measured trusting."""
    return frozenset(os.environ.get(TRUST, "").split())


class _GuardedUnpickler(pickle.Unpickler):
    """Python's own (C) unpickler, told what it may look up. Unlike previews, it needs no guard against
    memory exhaustion: whoever could send such a pickle runs the machine, and can stop the enclave anyway."""

    def __init__(self, data: bytes, packages: frozenset[str]) -> None:
        super().__init__(io.BytesIO(data))
        self.packages = packages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _OWN:
            return super().find_class(module, name)
        if module.partition(".")[0] in self.packages and "." not in name:
            found = super().find_class(module, name)
            # A name the package only imported (``from os import system``) is not the package's.
            if str(getattr(found, "__module__", "")).partition(".")[0] in self.packages:
                return found
        return plain_class(module, name, super().find_class)


def guarded_loads(data: bytes) -> Any:
    """The value of an artifact's pickle, read in an enclave: ``SealedError`` naming the first class it needs
    that is neither plain data, sealed, Metaflow's own nor defined in a trusted package."""
    try:
        return _GuardedUnpickler(data, trusted()).load()
    except NotPlainData as exc:
        package = str(exc).partition(".")[0]
        raise SealedError(
            f"an input needs {exc}, and a confidential step unpickles from outside its TEE only plain data, "
            "sealed values and the packages it trusts (a crafted pickle would run in the enclave)",
            fix=f"make it in a confidential step (it arrives sealed), or @confidential(trust=[{package!r}])",
        ) from None
