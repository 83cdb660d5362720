"""Operator commands: host set-up, image build, list, reap, doctor and the demo job."""
