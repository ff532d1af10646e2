"""Faults a federation must survive, measured: ``python -m bench.faults --json OUT``.

- ``kills``: the server (and its in-process clients) SIGKILLed at every phase of a time slot and
  a client killed inside its re-edit, then restarted; the final models against an uninterrupted run.
- ``reuse``: what a receiver's check of a reused z sees on SmolLM2 (``python -m bench.faults.reuse``).
- ``poisoning``: a member crafting its uploads to undo other members' facts, against the default job
  (``python -m bench.faults.poisoning``).
"""
