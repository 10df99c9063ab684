"""UniGRec: soft identifiers, annealing, codeword uniformity, dual distillation (``plugin``: config, schedule,
plug-in; ``model``: the joint model; ``losses``: the equations)."""
