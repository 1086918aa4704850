"""Re-identification toolkit: projections of the embedding and Market-1501 evaluation."""
