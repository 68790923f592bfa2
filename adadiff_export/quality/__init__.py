"""Quality measures: the Fashion-MNIST classifier and the metrics computed in its feature space."""
