"""The four stages gitlab-runner calls (config, prepare, run, cleanup) and the teardown that
cleanup, prepare's rollback and `reap` share.

Each stage is a separate process. What a later stage needs is in libvirt (the domain and its
metadata: IP, pinned host key, expiry) or in the job's state directory (its SSH client key),
both keyed by the VM name, which is derived from the job id in the job payload.
"""
