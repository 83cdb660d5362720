"""Stand-ins for what cannot exist on a development host: the gitlab-runner binary, Docker Hub
(a local registry), a company's HTTP proxy.

Not part of the executor's job path: only the demo command, the vm tests and the benchmarks
import this package (an import-linter contract forbids stages, adapters and core to).
"""
