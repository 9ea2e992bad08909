"""Training objectives, one module each (each returns ``(loss_dict, log_dict)``):

* :mod:`.tm_meanflow` — stage 1, TM-MeanFlow pretraining of the flow head
  (``from tmd_train.objectives.tm_meanflow import TMMeanFlowConfig, tm_meanflow``).
* :mod:`.dmd` — stage 2 pieces: the roll-out generator sample, the DMD loss and the fake-score
  loss (the GAN heads are :mod:`tmd_train.models.discriminator`).
"""
