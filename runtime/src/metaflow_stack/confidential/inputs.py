"""What a confidential step unpickles from outside its TEE: plain data, sealed values, and the classes it trusts.

Unpickling runs whatever the pickle names, and a task's inputs are read
from the datastore: whoever can write there (the launching machine's
operator among them) could hand an enclave a pickle that runs their code
inside it, with the data key in reach. So in an enclave every artifact is
unpickled through ``guarded_loads`` (Metaflow's serializer hook,
``plugins/confidential/input_guard``), on the plain-data unpickler of
``datastore.previews``, which admits:

* plain data (numbers, strings, bytes, containers, dates, decimals);
* a sealed value's envelope (``seal.Sealed``, rebuilt only through its
  checked constructor: what is inside opens only under the data key);
* Metaflow's own data holders (foreach frames, a ``@catch`` exception,
  an ``IncludeFile``'s descriptor) and numpy's array and dtype rebuilders;
* the classes the step names in ``@confidential(trust=[...])``, each by its
  full name (``sklearn.linear_model._logistic.LogisticRegression``), and
  only as classes: never a function, nor a name a module merely imported.

Anything else is refused before it is looked up, naming the exact class to
trust. No pickle may set state on a class, function or module. ``trust``
is fixed in the enclave's manifest, so it is part of the measurement a
policy pins; trusting a class accepts what its constructor and
``__setstate__`` do with data the datastore's writer chose.
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Any

from metaflow_stack.confidential.seal import SealedError
from metaflow_stack.datastore.previews import NotPlainData, PlainUnpickler

#: The variable (fixed in the manifest) listing the classes (``module.Class``) a step's enclave unpickles.
TRUST = "METAFLOW_STACK_CONFIDENTIAL_TRUST"
#: Names beyond plain data that carry no code of the pickle's choosing.
_OWN = frozenset(
    {
        ("metaflow_stack.confidential.seal", "Sealed"),
        ("__main__", "ForeachFrame"),  # a named tuple Metaflow puts in __main__ (the enclave's measured flow file)
        ("metaflow.exception", "MetaflowExceptionWrapper"),  # what @catch(var=...) keeps
        ("metaflow.includefile", "IncludedFile"),  # an IncludeFile parameter's descriptor
        # numpy's arrays and scalars: an empty array, a dtype, a scalar from its bytes; state set by numpy
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
    }
)
#: Packages whose classes are never trusted: Python's own and the framework's (their classes reach files,
#: processes and the flow).
UNTRUSTABLE = frozenset(sys.stdlib_module_names) | {"__main__", "builtins", "metaflow", "metaflow_stack"}


def trusted() -> frozenset[tuple[str, str]]:
    """The classes (module, name) this enclave was measured trusting."""
    return frozenset(tuple(n.rsplit(".", 1)) for n in os.environ.get(TRUST, "").split() if "." in n)  # type: ignore[misc]


def check_trust(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``names`` if each is a class's full name (``package.module.Class``) outside Python's and the
    framework's own packages; ``ValueError`` naming the first that is not."""
    for name in names:
        parts = name.split(".") if isinstance(name, str) else []
        if len(parts) < 2 or not all(part.isidentifier() for part in parts):
            raise ValueError(f"{name!r} is not a class's full name (sklearn.linear_model._logistic.LogisticRegression)")
        if parts[0] in UNTRUSTABLE:
            raise ValueError(f"{name!r} is in {parts[0]}, whose classes a confidential step never trusts")
    return tuple(sorted(set(names)))


class _GuardedUnpickler(PlainUnpickler):
    def __init__(self, data: bytes, classes: frozenset[tuple[str, str]]) -> None:
        super().__init__(data)
        self.classes = classes

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _OWN:
            return pickle._Unpickler.find_class(self, module, name)
        if (module, name) in self.classes:
            found = pickle._Unpickler.find_class(self, module, name)
            if isinstance(found, type) and found.__module__ == module:  # defined there, not imported
                return found
        return super().find_class(module, name)


def guarded_loads(data: bytes) -> Any:
    """The value of an artifact's pickle, read in an enclave: ``SealedError`` naming the first name it needs
    that is neither plain data, sealed, Metaflow's or numpy's own, nor a class the step trusts."""
    try:
        return _GuardedUnpickler(data, trusted()).load()
    except NotPlainData as exc:
        needed = str(exc)
        fix = (
            "make it in a confidential step (it arrives sealed)"
            if needed.split(".")[0] in UNTRUSTABLE or " " in needed
            else f"make it in a confidential step (it arrives sealed), or @confidential(trust=[{needed!r}])"
        )
        raise SealedError(
            f"an input needs {needed}, and a confidential step unpickles from outside its TEE only plain data, "
            "sealed values and the classes it trusts (a crafted pickle would run in the enclave)",
            fix=fix,
        ) from None
