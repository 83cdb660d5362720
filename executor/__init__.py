"""libvirt-executor: a GitLab Runner custom executor that runs each job in a throwaway VM."""

__version__ = "0.1.0"
