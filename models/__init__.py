"""Builders of the models the tests and benchmarks use (see build.py, round2.py, decoder.py)."""


def seeded_torch():
    """torch with its global seed set to 0 (the exports' random init), or None when it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    return torch
