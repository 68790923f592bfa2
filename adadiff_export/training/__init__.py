"""Training: the joint AdaDiff loss and the training loop."""
