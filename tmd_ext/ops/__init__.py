"""Autograd and fake (meta) registrations of the `tmd` ops, one module per op."""
