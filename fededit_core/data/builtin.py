"""The request sets that ship with the package, and how a ``data`` setting names a request file.

- ``federation_demo.jsonl``: 24 counterfactual edits whose records name one of 4 clients (``client``
  field) in two related pairs: client-0 and client-1 move landmarks to other cities, client-2 and
  client-3 change people's and countries' languages. With fewer clients, client-k's records go to
  client-(k mod n), so two clients still hold one pair each and every client has a related partner.
- ``demo_edits.jsonl``: the twelve facts of the single-model demo (``fededit demo``).
"""

from __future__ import annotations

from pathlib import Path

from fededit_core.data.clients import client_name
from fededit_core.data.loaders import DataError

HERE = Path(__file__).parent
BUILTIN_FEDERATION = HERE / "federation_demo.jsonl"
DEMO_EDITS = HERE / "demo_edits.jsonl"
BUILTIN_CLIENTS = 4  # the clients the records of federation_demo.jsonl name


def resolve_data(data: str) -> Path:
    """``builtin`` (the packaged federation demo set) or a path to a request file."""
    if data in ("", "builtin"):
        return BUILTIN_FEDERATION
    path = Path(data).expanduser()
    if not path.is_file():
        raise DataError(f"data {data!r}: no such file (use 'builtin' or a CounterFact / zsRE / JSONL file)")
    return path


def builtin_holders(holders: list[str | None], n_clients: int) -> list[str | None]:
    """The built-in set's ``client`` fields for a federation of ``n_clients``: client-k -> client-(k mod n)."""
    if n_clients > BUILTIN_CLIENTS:
        raise DataError(
            f"the built-in set holds edits for {BUILTIN_CLIENTS} clients, the federation has {n_clients}: "
            f'run at most {BUILTIN_CLIENTS} clients (--federation-config "num-supernodes={BUILTIN_CLIENTS}"), '
            f"or give a request file and split it evenly (--run-config \"data='FILE' partition='iid'\")"
        )
    index = {client_name(k): client_name(k % n_clients) for k in range(BUILTIN_CLIENTS)}
    return [index.get(h, h) if h is not None else None for h in holders]
