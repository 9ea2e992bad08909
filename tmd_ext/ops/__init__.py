"""Autograd and fake (meta) registrations of the `tmd` ops, one module per op named after it, and
the argument checks they share (:mod:`tmd_ext.ops.checks`) and the differentiable backward used when
a backward is itself recorded (:mod:`tmd_ext.ops.higher_order`)."""
