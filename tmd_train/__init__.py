"""tmd_train: training, sampling and evaluation of Transition Matching Distillation students."""
