"""MEMIT (Meng et al. 2023): hyperparameters, context templates, C0 = E[k kᵀ], the target z = h_L + δ,
the closed-form update Δ = R Kᵀ(λC0 + K Kᵀ)⁻¹ and the editor that applies it layer by layer."""
