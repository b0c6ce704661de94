"""The server's signature on the Flower App it submits, checked by every party before it
answers a message of that run. Flower verifies FABs only when they come from Flower Hub
(`--trusted-entities` needs the SuperLink's "valid_license" mark, which a locally submitted
FAB never gets), so fedllm signs its own: `fedllm certs` makes an Ed25519 key pair,
`fedllm serve` signs sha256(FAB) and the run's config with signing.key, and a party's
ClientApp (flower/pinned_client.py) and the ServerApp (flower/pinned_server.py) refuse any run whose signature signing.pub does not verify."""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

SIGNATURE = "fedllm-signature"  # the run-config key that carries the signature (empty in the FAB itself)
SIGNER_NODE_CONFIG = "app-signer"  # a party's node-config key: the server's signing.pub, as `fedllm join` was given it
SIGNER_ENV = "FEDLLM_APP_SIGNER"  # the server's: the environment variable serve sets to its signing.pub


class AppNotSigned(RuntimeError):
    """A run whose app this party's trusted key did not sign."""


def signed_bytes(fab: bytes, run_config: dict) -> bytes:
    """What the signature covers: the FAB's sha256 and every run-config value but the signature."""
    config = {k: v for k, v in run_config.items() if k != SIGNATURE}
    return json.dumps({"fab_sha256": hashlib.sha256(fab).hexdigest(), "run_config": config}, sort_keys=True).encode()


def sign_app(private_key: Path, fab: bytes, run_config: dict) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_private_key(Path(private_key).read_bytes(), password=None)
    return base64.b64encode(key.sign(signed_bytes(fab, run_config))).decode()


def load_signer(public_key: Path):
    """The server's Ed25519 public key from an OpenSSH .pub file (signing.pub); AppNotSigned
    saying why when the file is no such key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        key = serialization.load_ssh_public_key(Path(public_key).read_bytes())
    except Exception as err:  # noqa: BLE001 (unreadable, not OpenSSH, an unsupported algorithm: one mistake)
        raise AppNotSigned(f"{public_key} is not an OpenSSH public key ({type(err).__name__})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise AppNotSigned(f"{public_key} is not an Ed25519 key")
    return key


def verify_app(public_key: Path, fab: bytes, run_config: dict) -> None:
    """Returns if the run's signature verifies with `public_key`; AppNotSigned saying why if not."""
    from cryptography.exceptions import InvalidSignature

    key = load_signer(public_key)
    signature = run_config.get(SIGNATURE)
    if not isinstance(signature, str) or not signature:
        raise AppNotSigned("the run's app carries no fedllm signature: it was not submitted by `fedllm serve`")
    try:
        key.verify(base64.b64decode(signature, validate=True), signed_bytes(fab, run_config))
    except (InvalidSignature, ValueError):
        raise AppNotSigned(f"the run's app is not signed by the server's key ({public_key})") from None
