"""Autograd and fake (meta) registrations of the `tmd` ops, one module per op named after it, and
the argument checks they share (:mod:`tmd_ext.ops.checks`)."""
