"""Reference gateway and central queue for inference workers."""
