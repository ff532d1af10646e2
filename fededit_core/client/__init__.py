"""One organisation's side of the federation, Flower-free: the participant (time slots, its edited
layers, checkpoints) and the edit worker that answers every step."""
