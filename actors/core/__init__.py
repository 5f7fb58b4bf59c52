"""Pure torch + transformers: models, sampling, losses, monitors. Never imports ray."""
