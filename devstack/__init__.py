"""Development harness, not part of the product (not in the wheel or the images): start real
gateway and worker processes on loopback (:mod:`devstack.localstack`) and build tiny
random-weight models (:mod:`devstack.tiny_qwen3`) for the demo, the tests and the benchmarks."""
