"""Keyless cosign signatures made as Sigstore's are, for the cosign double (``tests/cosign_double``).

A private Fulcio (a root of the test's own: the double's ``SIGSTORE_ROOT_FILE``) issues a certificate naming
a workflow's identity (its SAN URI) and OIDC issuer (Fulcio's extension 1.3.6.1.4.1.57264.1.8), whose key
signs a Simple Signing payload naming an image's digest. Payload, signature and certificate are pushed as
cosign's signature specification lays them out: a layer of the OCI manifest tagged ``sha256-HEX.sig``
beside the image, after the signatures already there.
"""

from __future__ import annotations

import base64
import hashlib
import json

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tls_files import signed

#: Fulcio's OIDC issuer extensions: the raw string cosign reads, and its DER UTF8String successor.
ISSUER_RAW = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
ISSUER_DER = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"


class Fulcio:
    """A certificate authority standing in for Sigstore's Fulcio."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sigstore double")])
        constraints = [(x509.BasicConstraints(ca=True, path_length=1), True)]
        self.root = signed(self.name, self.key.public_key(), self.name, self.key, constraints)

    def root_pem(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.PEM)

    def issue(self, identity: str, issuer: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A signing key and its certificate for ``identity`` as ``issuer`` vouched for it."""
        key, said = ec.generate_private_key(ec.SECP256R1()), issuer.encode()
        assert len(said) < 128, "an issuer this long needs DER's long form of a length"
        extensions = [
            (x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), True),
            (x509.UnrecognizedExtension(ISSUER_RAW, said), False),
            (x509.UnrecognizedExtension(ISSUER_DER, b"\x0c" + bytes([len(said)]) + said), False),
        ]
        return key, signed(x509.Name([]), key.public_key(), self.name, self.key, extensions)


def signature_tag(digest: str) -> str:
    """Where cosign keeps the signatures of the image ``digest``: this tag of its repository."""
    return digest.replace(":", "-") + ".sig"


def sign(fulcio: Fulcio, registry: str, repository: str, digest: str, identity: str, issuer: str) -> None:
    """Sign the image ``repository@digest`` in ``registry`` as ``identity``, as ``cosign sign`` would."""
    key, certificate = fulcio.issue(identity, issuer)
    claims = {
        "critical": {
            "identity": {"docker-reference": f"{registry}/{repository}"},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature",
        },
        "optional": None,
    }
    payload = json.dumps(claims, separators=(",", ":")).encode()
    annotations = {
        "dev.cosignproject.cosign/signature": base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode(),
        "dev.sigstore.cosign/certificate": certificate.public_bytes(serialization.Encoding.PEM).decode(),
    }
    base, tag = f"http://{registry}/v2/{repository}", signature_tag(digest)
    with httpx.Client(timeout=30) as client:
        found = client.get(f"{base}/manifests/{tag}", headers={"Accept": MANIFEST})
        layers = found.json()["layers"] if found.status_code == 200 else []
        layers.append({"mediaType": SIMPLE_SIGNING, **_push(client, base, payload), "annotations": annotations})
        config = json.dumps({"architecture": "", "os": "", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **_push(client, base, config)},
            "layers": layers,
        }
        put = client.put(f"{base}/manifests/{tag}", content=json.dumps(manifest), headers={"Content-Type": MANIFEST})
        put.raise_for_status()


def _push(client: httpx.Client, base: str, blob: bytes) -> dict[str, object]:
    """Upload ``blob`` (the Distribution API's monolithic upload); its descriptor's digest and size."""
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    started = client.post(f"{base}/blobs/uploads/")
    started.raise_for_status()
    location = httpx.URL(base).join(started.headers["Location"])
    client.put(location.copy_merge_params({"digest": digest}), content=blob).raise_for_status()
    return {"digest": digest, "size": len(blob)}
