"""Backends behind `deep_ep.Buffer`: `cuda` (thin plumbing over the compiled extension deep_ep._C) and
`reference` (the pure-PyTorch semantics over torch.distributed: CPU fallback and test oracle)."""
