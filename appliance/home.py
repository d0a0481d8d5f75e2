"""The appliance home: one directory (0700) holding the ledger, the store, keys and work."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from keys.errors import ApplianceError

ENV_HOME = "APPLIANCE_HOME"
# The root public key a verifier trusts (the trust store's anchor), obtained out of band:
# this variable, else the system-wide file (root-owned: the service user cannot replace it),
# else the copy in the home, which only proves that the home is self-consistent.
ENV_ROOT_KEY = "APPLIANCE_ROOT_KEY"
SYSTEM_ROOT_KEY = Path("/etc/appliance/root.pub.pem")


def default_home() -> Path:
    """``$APPLIANCE_HOME``, else ``~/.local/share/appliance``."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "share" / "appliance"


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def key_file(self) -> Path:
        return self.root / "keys" / "node.key"  # Argon2id + AES-GCM envelope (keys/keystore.py)

    @property
    def public_key_file(self) -> Path:
        return self.root / "keys" / "node.pub.pem"

    @property
    def root_key_file(self) -> Path:
        # The root key is made here at `init`; the operator moves it offline (README).
        return self.root / "keys" / "root.key"

    @property
    def root_public_key_file(self) -> Path:
        return self.root / "keys" / "root.pub.pem"

    @property
    def release_key_file(self) -> Path:
        # Signs exports; under the node key's passphrase, trusted only through the trust store
        # (`appliance keys release-init`, appliance/service/release.py).
        return self.root / "keys" / "release.key"

    @property
    def trust_file(self) -> Path:
        return self.root / "keys" / "truststore.json"

    def root_anchor(self) -> tuple[Path, str]:
        """Where the trusted root public key comes from, and how to say so."""
        env = os.environ.get(ENV_ROOT_KEY)
        if env:
            return Path(env).expanduser(), f"{ENV_ROOT_KEY}={env}"
        if SYSTEM_ROOT_KEY.is_file():
            return SYSTEM_ROOT_KEY, str(SYSTEM_ROOT_KEY)
        return self.root_public_key_file, f"{self.root_public_key_file}, the home's own copy"

    @property
    def policy_file(self) -> Path:
        # Takes effect only with its root signature beside it (policy.toml.sig).
        return self.root / "policy.toml"

    @property
    def policy_signature_file(self) -> Path:
        return self.root / "policy.toml.sig"

    @property
    def ledger_file(self) -> Path:
        return self.root / "ledger.duckdb"

    @property
    def head_file(self) -> Path:
        return self.root / "ledger.head.json"

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    @property
    def data_keys_dir(self) -> Path:
        """The data key table (`appliance.service.datakeys`): one wrapped key per sealed artifact."""
        return self.root / "keys" / "data"

    @property
    def purge_dir(self) -> Path:
        """Purge certificates, one signed JSON file per purge."""
        return self.root / "purge"

    @property
    def work_dir(self) -> Path:
        return self.root / "work"

    @property
    def corpora_dir(self) -> Path:
        return self.root / "corpora"

    def exists(self) -> bool:
        return self.ledger_file.is_file() and self.key_file.is_file()

    def is_empty(self) -> bool:
        """Neither ledger nor key: safe to initialise here."""
        return not self.ledger_file.exists() and not self.key_file.exists()

    def require(self) -> None:
        """Raise unless the home has been initialised; a half-present home says what is missing."""
        if self.exists():
            return
        if self.is_empty():
            raise ApplianceError(
                f"{self.root} is not an initialised appliance home (no ledger or node key)",
                f"run `appliance init --home {self.root}` or set {ENV_HOME}",
            )
        missing, present = (self.key_file, self.ledger_file) if self.ledger_file.is_file() else (self.ledger_file, self.key_file)
        raise ApplianceError(
            f"{self.root} has {present.name} but {missing} is missing",
            f"restore {missing.name} from your backup; do not initialise over this home, its ledger and key belong together",
        )

    def create_dirs(self) -> None:
        """Create the home's folders, private to the service user."""
        for d in (self.root, self.root / "keys", self.store_dir, self.work_dir, self.corpora_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
