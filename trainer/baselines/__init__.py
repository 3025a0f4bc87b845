"""Baseline models trained and scored on the same splits and metrics as the multi-task model.

- ``logistic``: logistic regression per action over the one-hot hashed ids of every sparse
  feature plus the normalised dense features (a wide model).
- ``xgboost``: gradient boosted trees per action over the dense features plus count and
  out-of-fold target encodings of the hashed ids.

Both read the splits through ``trainer.data.SplitData`` and score through
``trainer.evaluate.report_predictions``, so keep-rate correction, metrics and NDCG are the
trainer's own.
"""
