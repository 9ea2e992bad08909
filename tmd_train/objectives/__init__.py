"""Training objectives, one module each (each returns ``(loss_dict, log_dict)``):

* :mod:`.tm_meanflow` — stage 1, TM-MeanFlow pretraining of the flow head
  (``from tmd_train.objectives.tm_meanflow import TMMeanFlowConfig, tm_meanflow``).
"""
