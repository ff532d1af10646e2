"""Malformed input through the federation's three doors: the server's, the client's, the loaders'.

``python -m bench.fuzz --n 1000 --json OUT`` generates, with a fixed seed:

- **server**: ``n`` malformed replies per step type (whoami, hello, tags, edit, reedit, rejected,
  evaluate, editavg_update, editavg_apply, collab), each fed to one client's first reply to that
  step in a whole run on the real server path (``discover`` -> ``FlowerTransport`` with the wire
  decoder -> the strategy -> validation -> the SQLite store -> serving), among 4 scripted honest
  clients without a model (min-clients 2);
- **client**: ``n`` malformed instructions through the real ClientApp handler (wire decoder ->
  instruction schema -> the edit worker), on the model ``--model`` (default: the embedded one);
- **loaders**: ``n`` malformed request files (plus a named pipe, a folder and a file over the size
  cap) through ``load_requests``.

Each case ends one of three ways: ``rejected`` (the server left the client out and the run went on /
the client answered with its own step error / the loader raised ``DataError``), ``accepted_invalid``
(the input was taken as valid) or ``crashed`` (any other exception, or a loader that did not
return within 10 s). The goal is zero crashes and zero accepted-invalid.
"""
