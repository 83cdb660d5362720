"""executor.adapters.guest_docker: the pure parts (Docker's stream framing, pull progress)."""

from __future__ import annotations

from executor.adapters.guest_docker import PullProgress, _frames


class ChunkedSocket:
    """Hands out bytes in the pieces given, as a TLS socket may: frames split and joined."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)

    def recv(self, _n: int) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


def frame(kind: int, payload: bytes) -> bytes:
    return bytes([kind, 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload


def test_frames_are_split_into_stdout_and_stderr_whatever_the_chunking():
    stream = frame(1, b"out one\n") + frame(2, b"err\n") + frame(1, b"out two\n")
    pieces = [stream[:3], stream[3:13], stream[13:30], stream[30:]]
    assert list(_frames(ChunkedSocket(pieces))) == [(b"out one\n", None), (None, b"err\n"), (b"out two\n", None)]


def test_a_truncated_frame_at_eof_is_dropped_not_misread():
    assert list(_frames(ChunkedSocket([frame(1, b"whole"), frame(1, b"cut short")[:10]]))) == [(b"whole", None)]


def test_pull_progress_sums_layers_and_counts_finished_ones():
    progress = PullProgress()
    for event in (
        {"status": "Pulling fs layer", "id": "aaaaaaaaaaaa"},
        {"status": "Downloading", "id": "aaaaaaaaaaaa", "progressDetail": {"current": 1_000_000, "total": 4_000_000}},
        {"status": "Already exists", "id": "bbbbbbbbbbbb"},
        {"status": "Downloading", "id": "cccccccccccc", "progressDetail": {"current": 500_000, "total": 2_000_000}},
        {"status": "Pull complete", "id": "cccccccccccc"},
        {"status": "Digest: sha256:abc"},
    ):
        progress.update(event)
    assert progress.line() == "2/3 layers, 3.0/6.0 MB downloaded"


def test_pull_progress_says_when_layers_are_being_unpacked_and_how_far():
    """A big image's layers download in seconds and unpack for a minute under TCG: the line
    must keep moving then, not repeat the finished download."""
    progress = PullProgress()
    lines = []
    for event in (
        {"status": "Pulling fs layer", "id": "aaaaaaaaaaaa"},
        {"status": "Pulling fs layer", "id": "bbbbbbbbbbbb"},
        {"status": "Downloading", "id": "aaaaaaaaaaaa", "progressDetail": {"current": 80_000_000, "total": 80_000_000}},
        {"status": "Download complete", "id": "aaaaaaaaaaaa"},
        {"status": "Downloading", "id": "bbbbbbbbbbbb", "progressDetail": {"current": 4_000_000, "total": 4_000_000}},
        {"status": "Download complete", "id": "bbbbbbbbbbbb"},
        {"status": "Extracting", "id": "aaaaaaaaaaaa", "progressDetail": {"current": 20_000_000, "total": 80_000_000}},
        {"status": "Extracting", "id": "aaaaaaaaaaaa", "progressDetail": {"current": 60_000_000, "total": 80_000_000}},
        {"status": "Pull complete", "id": "aaaaaaaaaaaa"},
        {"status": "Extracting", "id": "bbbbbbbbbbbb", "progressDetail": {"current": 1_000_000, "total": 4_000_000}},
        {"status": "Pull complete", "id": "bbbbbbbbbbbb"},
    ):
        progress.update(event)
        lines.append(progress.line())
    assert lines[5] == "0/2 layers, 84.0/84.0 MB downloaded"
    assert lines[6:10] == [
        "0/2 layers, 84.0/84.0 MB downloaded, unpacking: 20.0/84.0 MB unpacked",
        "0/2 layers, 84.0/84.0 MB downloaded, unpacking: 60.0/84.0 MB unpacked",
        "1/2 layers, 84.0/84.0 MB downloaded",
        "1/2 layers, 84.0/84.0 MB downloaded, unpacking: 81.0/84.0 MB unpacked",
    ]
    assert lines[-1] == "2/2 layers, 84.0/84.0 MB downloaded"
