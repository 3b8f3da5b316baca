"""Batch jobs: OpenAI's Files and Batch APIs (:mod:`.routes`), their logic (:mod:`.batches`,
:mod:`.files`), the runner (:mod:`.runner`), wire models (:mod:`.models`) and the
``inference-batch`` command (:mod:`.cli`)."""
