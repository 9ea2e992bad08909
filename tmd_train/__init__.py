"""tmd_train: Transition Matching Distillation — student model, samplers, data and training stages
(`python -m tmd_train.<stage>`)."""
