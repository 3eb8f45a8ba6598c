"""The CLIP backbone: loading (hub or local path), the features methods train on, and the cache
of frozen image features that makes FLoRA's local step cheap."""
