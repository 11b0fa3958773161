"""The torch plumbing both models share: devices, autocast and batched encoding (encode), the
frozen-feature store (features), the pretrained tower packages (towers). Imports only
``pipeline.core``; ``teacher`` and ``student`` build on it."""
