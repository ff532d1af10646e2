"""What a receiver's check of a reused z sees on SmolLM2: ``python -m bench.faults.reuse``.

Client b edits 8 built-in requests in slot 0, then 8 more in slot 1; client a edits 8 others.
For b's slot-1 requests, a computes the target probability with z written in
(``MemitEditor.target_prob``) on its own edited model: for b's honest z, for h (no edit), for b's
z moved to the neighbouring request, and for z = h - 3 delta (the fact pushed back). The threshold
``DEFAULT_REUSE_MIN_PROB`` must pass the first and refuse the others.
"""

from __future__ import annotations

import json

import torch

from fededit_core.client.participant import Participant
from fededit_core.data.builtin import resolve_data
from fededit_core.data.loaders import load_requests
from fededit_core.fedleke.reedit import DEFAULT_REUSE_MIN_PROB
from fededit_core.memit.editor import make_editor


def main() -> None:
    torch.manual_seed(0)
    editor = make_editor("smollm2-135m")
    requests = load_requests(resolve_data("builtin"))
    own_a, own_b, reused = requests[0:8], requests[8:16], requests[16:24]
    b = Participant("b", editor, own_b + reused, n_slots=2)
    b.edit_slot(0)
    b.edit_slot(1)
    z, delta = b.own.z[-8:], b.own.delta[-8:]
    h = z - delta
    b.activate()
    at_sender = editor.target_prob(reused, z)
    a = Participant("a", editor, own_a, n_slots=1)
    a.edit_slot(0)
    a.activate()
    probs = {
        "honest z at its sender": at_sender,
        "honest z at the receiver": editor.target_prob(reused, z),
        "h (no edit)": editor.target_prob(reused, h),
        "z of the neighbouring request": editor.target_prob(reused, torch.roll(z, 1, 0)),
        "h - 3 delta (pushed back)": editor.target_prob(reused, h - 3 * delta),
    }
    print(f"stop_prob {editor.hp.stop_prob}, reuse-min-prob {DEFAULT_REUSE_MIN_PROB}")
    for name, p in probs.items():
        refused = int((p < DEFAULT_REUSE_MIN_PROB).sum())
        print(f"{name:32s} min {p.min():.3f} max {p.max():.3f}  refused {refused}/{len(p)}")
    print(json.dumps({k: [round(float(x), 4) for x in v] for k, v in probs.items()}))


if __name__ == "__main__":
    main()
