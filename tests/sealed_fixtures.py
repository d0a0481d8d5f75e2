"""A clean process keyring and seal map for each test that seals files (they are process-global)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from keys import sealed


@pytest.fixture
def keyring(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No data keys and nothing to seal, before and after the test; no job environment read."""
    monkeypatch.delenv(sealed.ENV_KEYS, raising=False)
    monkeypatch.delenv(sealed.ENV_SEAL, raising=False)
    sealed.reset_for_tests()
    yield
    sealed.reset_for_tests()


def key_in_ring() -> str:
    """A fresh data key, added to this process's keyring; its id."""
    key_id, key = sealed.new_key()
    sealed.add_key(key_id, key)
    return key_id
