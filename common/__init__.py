"""What the worker and the gateway share: queue protocol v1's wire models (:mod:`common.protocol`),
the prompt-template language both check and render (:mod:`common.prompts`), and the process
memory settings both apply at start (:mod:`common.heap`). Neither side imports the other."""
