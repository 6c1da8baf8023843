"""What is learnt: models.py, pretrained.py (model.weights), optim.py (optimizers, LR scales,
schedules), losses.py, mixing.py (mixup / cutmix), ema.py, metrics.py."""
