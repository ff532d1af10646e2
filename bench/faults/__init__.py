"""Faults a federation must survive, measured: ``python -m bench.faults --json OUT``.

- ``kills``: the server (and its in-process clients) SIGKILLed at every phase of a time slot and
  a client killed inside its re-edit, then restarted; the final models against an uninterrupted run.
- ``poisoning``: a member that uploads crafted MKV sets against the default job; the victims'
  own Score with and without the defences.
"""
