"""The client API: thin route handlers (:mod:`.routes`), their logic (:mod:`.serving`), the
checks of client input (:mod:`.inputs`), the wire models (:mod:`.models`) and quantized
embeddings (:mod:`.quantize`)."""
