"""FedEdit's per-client math (FedLEKE, Zhao et al. 2025): mediator knowledge vectors, the re-edit
condition (Eq. 8) and the keyed request tags used for z reuse."""
