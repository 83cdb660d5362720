"""Operations on one job's VM that the stages and the operator commands share.

They combine adapters (libvirt, the state directory, host files) and so sit above them; the
stages and `admin` both use them and never each other. `teardown` is the one way to remove a
job VM (cleanup, prepare's rollback, reap); `record` reads a live job VM's metadata; `accel`
picks the accelerator.
"""
