"""The host agent: the one long-running process of ours on a runner host (`libvirt-executor
agent`). It keeps the warm pool (keeper); later parts (metrics, background removal, cache
maintenance) join it. A job never needs it: without it prepare boots cold and cleanup removes
synchronously. It imports jobvm, adapters and core, never stages or admin; `client` is the side
`admin` uses to start, stop and read it.
"""
