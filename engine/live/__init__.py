"""Live driving: code sources (face tracker, socket, file), the tracker -> code map, sinks and the viewer server.

Nothing here is imported by the reference render path; the tracker needs the `live` extra (MediaPipe).
"""
