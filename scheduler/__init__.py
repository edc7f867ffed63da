"""Batching policy, torch-free: which jobs run together, and what each will cost."""
