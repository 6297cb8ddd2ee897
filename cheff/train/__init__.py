"""Training: the shared loop (``loop``), MaCheX batches (``data``), one task per model (``ae``)."""
